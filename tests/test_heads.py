"""Fine-tuning heads: config checks, pooling, AAM-softmax, DCA fusion, TaskModel modes, losses and training."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from avssl.config import ConfigError
from avssl.finetune.config import HeadConfig
from avssl.finetune.heads import (
    BONA_FIDE,
    AAMSoftmax,
    AttentiveStatsPooling,
    DCAFusion,
    MaskedBatchNorm,
    MeanPooling,
    TaskModel,
    margin_at,
    zero_shot_embeddings,
)
from avssl.pretrain.config import LossConfig, MaskingConfig, ModelConfig, build_model
from avssl.pretrain.masking import ModalityMask, end_segments
from avssl.pretrain.lr_decay import layer_id

FRAMES, MELS, VFRAMES, SIZE = 98, 64, 2, 32


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny matrices: two threads on two shared cores mostly wait on each other (10x slower under load).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_backbone():
    torch.manual_seed(0)
    model = ModelConfig(
        arch="avvit_tiny_patch16",
        audio_num_mel_bins=MELS,
        audio_num_frames=FRAMES,
        video_image_size=SIZE,
        video_num_frames=VFRAMES,
    )
    return build_model(model, MaskingConfig(), LossConfig()).avvit


@pytest.fixture(scope="module")
def cls_backbone():
    """The tiny backbone with a CLS token per modality, in eval mode; read only (heads take copies)."""
    torch.manual_seed(0)
    model = ModelConfig(arch="avvit_tiny_patch16", audio_num_mel_bins=MELS, audio_num_frames=FRAMES,
                        video_image_size=SIZE, video_num_frames=VFRAMES, use_cls_token=True)
    return build_model(model, MaskingConfig(), LossConfig()).avvit.eval()


@pytest.fixture
def backbone(tiny_backbone):
    """A fresh copy per test: TaskModel may freeze it and tests train it."""
    return copy.deepcopy(tiny_backbone)


def batch(b: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, FRAMES, MELS, generator=g), torch.randn(b, VFRAMES, 3, SIZE, SIZE, generator=g)


def flags(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.bool)


def head(task: str, **kw) -> HeadConfig:
    if task == "speaker":
        kw.setdefault("num_classes", 5)
    kw.setdefault("dropout", 0.0)
    return HeadConfig(task=task, **kw)


# ---------------------------------------------------------------- config


def test_head_config_task_defaults_and_cross_field_checks(backbone):
    """Task defaults fill in (classes, pooling, co-learning) and inconsistent combinations are rejected."""
    emotion, speaker, spoof = HeadConfig(task="emotion"), HeadConfig(task="speaker"), HeadConfig(task="spoof")
    assert (emotion.num_classes, emotion.pooling, emotion.fusion, emotion.co_learning) == (6, "mean", "joint", True)
    assert (speaker.num_classes, speaker.pooling, speaker.embedding_dim) == (None, "asp", 192)
    assert (speaker.aam_margin, speaker.aam_scale, spoof.num_classes) == (0.2, 30.0, 2)
    assert HeadConfig(task="emotion", modalities=["audio"]).co_learning is False
    bad = [
        dict(task="emotion", fusion="late", modalities=["audio"]),
        dict(task="emotion", fusion="dca", modalities=["video"]),
        dict(task="emotion", modalities=["audio"], co_learning=True),
        dict(task="emotion", modalities=["audio"], modality_dropout=0.5),
        dict(task="emotion", modalities=["audio", "audio"]),
        dict(task="spoof", num_classes=3),
        dict(task="emotion", class_weights=[1.0, 2.0]),
        dict(task="emotion", pooling="max"),
        dict(task="emotion", modality_dropout=1.5),
        dict(task="emotion", unknown_key=1),
        dict(task="emotion", fusion="joint", late_weights="learned"),
        dict(task="spoof", modalities=["audio"], co_learning=False, segment_consistency=["video"]),
        dict(task="spoof", segment_consistency=["audio", "audio"]),
        dict(task="spoof", segment_consistency=["audio"], segment_fraction=0.6),
    ]
    for kwargs in bad:
        with pytest.raises(ValidationError):
            HeadConfig(**kwargs)
    cfg = HeadConfig(task="speaker")
    with pytest.raises(ConfigError, match="num_classes"):
        TaskModel(backbone, cfg)
    cfg.num_classes = 7  # what the runner does; validated on assignment
    with pytest.raises(ValidationError):
        cfg.num_classes = 1


# ---------------------------------------------------------------- pooling


def test_attentive_stats_pooling_matches_hand_computation():
    """ASP = per-channel softmax-weighted mean and std over real tokens only; padding ignored; empty rows 0."""
    torch.manual_seed(0)
    pool = AttentiveStatsPooling(2, bottleneck=3)
    x = torch.tensor(
        [
            [[1.0, -2.0], [3.0, 0.5], [1e4, -1e4]],  # last token is padding with a huge value
            [[0.3, 0.7], [5.0, 5.0], [5.0, 5.0]],  # one real token: std = sqrt(eps)
            [[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]],  # no real token
        ]
    )
    mask = flags(1, 1, 0, 1, 0, 0, 0, 0, 0).view(3, 3)
    out = pool(x, mask)
    assert out.shape == (3, 4)
    with torch.no_grad():
        scores = pool.attention(x)  # (B, N, D): the learned scorer; the rest is done by hand below
    for b in range(2):
        real = [t for t in range(3) if mask[b, t]]
        for c in range(2):
            e = [math.exp(scores[b, t, c].item()) for t in real]
            w = [v / sum(e) for v in e]
            mean = sum(wi * x[b, t, c].item() for wi, t in zip(w, real))
            var = sum(wi * x[b, t, c].item() ** 2 for wi, t in zip(w, real)) - mean**2
            std = math.sqrt(max(var, pool.eps))
            assert out[b, c].item() == pytest.approx(mean, rel=1e-5, abs=1e-5)
            assert out[b, 2 + c].item() == pytest.approx(std, rel=1e-4, abs=1e-5)
    assert torch.equal(out[2], torch.zeros(4))
    assert torch.allclose(MeanPooling(2)(x, mask)[0], torch.tensor([2.0, -0.75]))


# ---------------------------------------------------------------- AAM-softmax


def test_masked_batch_norm_uses_present_rows_only():
    """Training: standardized with the present rows' statistics (= BatchNorm1d without affine on them),
    absent rows stay 0 and do not move the running statistics; eval: the running statistics."""
    torch.manual_seed(0)
    x = torch.randn(6, 4) * torch.tensor([1.0, 5.0, 0.1, 2.0]) + torch.tensor([3.0, -1.0, 10.0, 0.0])
    present = torch.tensor([True, True, False, True, True, False])
    x_absent = x.clone()
    x_absent[~present] = 1e6  # must not matter
    norm, ref = MaskedBatchNorm(4).train(), torch.nn.BatchNorm1d(4, affine=False).train()
    out = norm(x_absent, present)
    assert torch.allclose(out[present], ref(x[present]), atol=1e-5) and out[~present].abs().sum() == 0
    assert torch.allclose(norm.running_mean, ref.running_mean) and torch.allclose(norm.running_var, ref.running_var)
    norm.eval(), ref.eval()
    assert torch.allclose(norm(x, present)[present], ref(x[present]), atol=1e-5)
    norm.train()
    one = norm(x[:1], present[:1])  # a single present row: running statistics, nothing updated
    assert torch.allclose(one, ref(x[:1]), atol=1e-5) and torch.allclose(norm.running_mean, ref.running_mean)


def test_aam_softmax_margin_zero_is_scaled_cosine_cross_entropy():
    """With margin 0 the logits are scale * cosine and the loss is plain cross-entropy on them."""
    torch.manual_seed(0)
    aam = AAMSoftmax(8, 5, margin=0.0, scale=30.0)
    emb, y = torch.randn(6, 8), torch.tensor([0, 1, 2, 3, 4, 0])
    loss, logits = aam(emb, y)
    cosine = F.normalize(emb) @ F.normalize(aam.weight).T
    assert torch.allclose(logits, 30.0 * cosine, atol=1e-5)
    assert torch.allclose(loss, F.cross_entropy(30.0 * cosine, y), atol=1e-5)
    # Unlabelled rows (-1) are left out of the mean.
    masked, _ = aam(emb, torch.tensor([0, 1, -1, 3, 4, -1]))
    keep = [0, 1, 3, 4]
    assert torch.allclose(masked, F.cross_entropy(30.0 * cosine[keep], y[keep]), atol=1e-5)


def test_aam_margin_lowers_only_the_target_logit_and_stays_finite():
    """A margin replaces the target's cos(theta) by cos(theta + m) (continued past pi - m), others unchanged."""
    aam = AAMSoftmax(4, 3, margin=0.2, scale=10.0)
    cosine = torch.tensor([[0.9, 0.1, -0.3], [-0.99, 0.5, 0.2], [1.0, 0.0, 0.0]], requires_grad=True)
    y = torch.tensor([0, 0, 0])
    logits = aam.margin_logits(cosine, y)
    assert logits[0, 0].item() == pytest.approx(10 * math.cos(math.acos(0.9) + 0.2), rel=1e-5)
    # theta > pi - m: the target logit continues linearly below cos(pi) instead of rising again.
    assert logits[1, 0].item() == pytest.approx(10 * (-0.99 - 1 - math.cos(math.pi - 0.2)), rel=1e-5)
    assert (logits[:, 0] < 10 * cosine[:, 0]).all()
    assert torch.allclose(logits[:, 1:], 10 * cosine[:, 1:])
    logits.sum().backward()  # cos = 1 exactly: the sine's gradient must stay finite
    assert torch.isfinite(cosine.grad).all()
    emb, yy = torch.randn(4, 4), torch.tensor([0, 1, 2, 0])
    with_margin, _ = aam(emb, yy)
    aam.set_margin(0.0)
    without, _ = aam(emb, yy)
    assert with_margin > without


def test_margin_warmup_schedule_drives_the_aam_heads(backbone):
    """Margin rises linearly 0 -> aam_margin over margin_warmup_steps; forward(step=...) applies it."""
    assert [margin_at(s, 0.2, 10) for s in (0, 5, 10, 50)] == pytest.approx([0.0, 0.1, 0.2, 0.2])
    assert margin_at(0, 0.2, 0) == 0.2
    model = TaskModel(backbone, head("speaker", fusion="late", margin_warmup_steps=10)).eval()
    assert model.margin == 0.0
    audio, video = batch(2)
    model(audio, video, step=5)
    assert all(h.aam.margin == pytest.approx(0.1) for h in model.heads.values())
    model.set_step(30)
    assert model.margin == pytest.approx(0.2)


# ---------------------------------------------------------------- DCA


def test_dca_gate_and_output_match_the_formula():
    """DCA: X_att = masked joint cross-attention; G = softmax(Linear(X_att)/T); out = ReLU(G0*X + G1*X_att)."""
    torch.manual_seed(0)
    d, temp = 4, 0.1
    dca = DCAFusion(d, temperature=temp)
    xa, xv = torch.randn(2, 2, d), torch.randn(2, 3, d)
    ma, mv = flags(1, 1, 1, 0).view(2, 2), flags(1, 1, 0, 0, 0, 0).view(2, 3)  # sample 1: audio only, one token
    out = dca({"audio": xa, "video": xv}, {"audio": ma, "video": mv})

    def lin(layer, x):
        return x @ layer.weight.T + layer.bias

    joint, jmask = torch.cat([xa, xv], 1), torch.cat([ma, mv], 1)
    for m, x in (("audio", xa), ("video", xv)):
        with torch.no_grad():
            q, k, v = lin(dca.query[m], x), lin(dca.key[m], joint), lin(dca.value[m], joint)
            att = torch.zeros_like(x)
            for b in range(2):
                keys = jmask[b].nonzero().flatten()
                w = torch.softmax(q[b] @ k[b, keys].T / math.sqrt(d), dim=-1)  # real keys only
                att[b] = w @ v[b, keys]
            g_logits = lin(dca.gate[m], att)
            gate = torch.softmax(g_logits / temp, dim=-1)
            expected = torch.relu(gate[..., :1] * x + gate[..., 1:] * att)
        assert torch.allclose(out.attended[m], att, atol=1e-5)
        assert torch.allclose(out.gates[m], gate, atol=1e-5)
        assert not torch.allclose(out.gates[m], torch.softmax(g_logits, -1), atol=1e-3)  # the temperature matters
        assert torch.allclose(out.gates[m].sum(-1), torch.ones(2, x.shape[1]))
        assert torch.allclose(out.tokens[m], expected, atol=1e-5)
    # Padded tokens never reach a real token's output.
    xv2 = xv.clone()
    xv2[0, 2] += 100.0
    xv2[1] += 100.0
    out2 = dca({"audio": xa, "video": xv2}, {"audio": ma, "video": mv})
    assert torch.allclose(out2.tokens["audio"][ma], out.tokens["audio"][ma], atol=1e-5)
    assert torch.allclose(out2.tokens["video"][mv], out.tokens["video"][mv], atol=1e-5)
    # A sample with no real token at all stays finite.
    empty = dca({"audio": xa}, {"audio": torch.zeros(2, 2, dtype=torch.bool)})
    assert torch.isfinite(empty.tokens["audio"]).all() and torch.equal(empty.attended["audio"], torch.zeros_like(xa))


# ---------------------------------------------------------------- TaskModel


@pytest.mark.parametrize(
    "fusion,modalities",
    [
        ("joint", ["audio", "video"]),
        ("joint", ["audio"]),
        ("joint", ["video"]),
        ("late", ["audio", "video"]),
        ("dca", ["audio", "video"]),
    ],
)
def test_task_model_output_shapes(backbone, fusion, modalities):
    """Every task x fusion x modality set gives the documented output, score and embedding shapes."""
    audio, video = batch(3)
    labels = {"emotion": torch.tensor([0, 5, -1]), "speaker": torch.tensor([0, 4, 2]), "spoof": torch.tensor([1, 0, 1])}
    fused = "av" if len(modalities) == 2 else modalities[0][0]
    for task, classes in (("emotion", 6), ("speaker", 5), ("spoof", 2)):
        pooling = "asp" if task == "spoof" else None  # asp on a classification task too
        cfg = head(task, fusion=fusion, modalities=modalities, **({"pooling": pooling} if pooling else {}))
        model = TaskModel(backbone, cfg).eval()
        out = model(audio, video, labels=labels[task])
        pooled = 192 * (2 if cfg.pooling == "asp" else 1)
        assert out.logits.shape == (3, classes), (task, fusion)
        assert out.embeddings.shape == (3, 192 if task == "speaker" else pooled)
        expected_modes = {"av", "a", "v"} if fused == "av" else {fused}
        assert set(out.per_modality) == expected_modes and set(out.loss_parts) == expected_modes
        width = 192 if task == "speaker" else classes
        assert all(v.shape == (3, width) for v in out.per_modality.values())
        assert out.loss.ndim == 0 and torch.isfinite(out.loss)
        score_shape = {"emotion": (3, 6), "speaker": (3, 192), "spoof": (3,)}[task]
        assert model.scores(audio, video).shape == score_shape
        emb = model.embed(audio, video, mode=fused)
        assert emb.shape == (3, 192 if task == "speaker" else pooled)
        assert torch.allclose(emb.norm(dim=-1), torch.ones(3), atol=1e-5)
    if fused != "av":  # "av" on a single-modality model is its one modality; the other one is refused
        assert torch.equal(model.embed(audio, video, mode="av"), model.embed(audio, video, mode=fused))
        with pytest.raises(ValueError, match="needs"):
            model.embed(audio, video, mode="v" if fused == "a" else "a")


def test_co_learning_loss_is_the_sum_of_av_a_v_parts(backbone):
    """Co-learning loss = L_AV + L_A + L_V, each over samples having the mode's input; without it only L_AV."""
    audio, video = batch(4)
    has_audio, has_video = flags(1, 1, 0, 1), flags(1, 0, 1, 1)
    labels = torch.tensor([0, 1, 2, 3])
    model = TaskModel(backbone, head("emotion", fusion="joint")).train()
    out = model(audio, video, has_audio, has_video, labels=labels)
    assert set(out.loss_parts) == {"av", "a", "v"}
    assert torch.allclose(out.loss, out.loss_parts["av"] + out.loss_parts["a"] + out.loss_parts["v"])
    for mode, present in (("a", has_audio), ("v", has_video), ("av", has_audio | has_video)):
        ref = F.cross_entropy(out.per_modality[mode][present], labels[present])
        assert torch.allclose(out.loss_parts[mode], ref, atol=1e-5), mode
    single = TaskModel(backbone, head("emotion", fusion="joint", co_learning=False)).train()
    single.load_state_dict(model.state_dict())
    alone = single(audio, video, has_audio, has_video, labels=labels)
    assert set(alone.loss_parts) == {"av"} and torch.allclose(alone.loss, out.loss_parts["av"], atol=1e-5)


def test_modality_dropout_never_drops_both_and_is_off_in_eval(backbone):
    """Modality dropout removes one modality of AV samples only (never both), follows p, and is off in eval."""
    torch.manual_seed(0)
    model = TaskModel(backbone, head("emotion", fusion="late", modality_dropout=1.0)).train()
    has_a, has_v = flags(*([1] * 200 + [1, 0])), flags(*([1] * 200 + [0, 1]))
    a, v = model.drop_modalities(has_a, has_v)
    assert torch.equal(a ^ v, torch.ones(202, dtype=torch.bool))  # exactly one left, everywhere
    assert torch.equal(a[200:], has_a[200:]) and torch.equal(v[200:], has_v[200:])  # single ones untouched
    assert 60 < int(a[:200].sum()) < 140
    model.cfg.modality_dropout = 0.5
    a, v = model.drop_modalities(torch.ones(2000, dtype=torch.bool), torch.ones(2000, dtype=torch.bool))
    assert not (~a & ~v).any() and 0.4 < (a ^ v).float().mean().item() < 0.6
    model.eval()
    assert all(torch.equal(x, y) for x, y in zip(model.drop_modalities(has_a, has_v), (has_a, has_v)))
    # Through forward: with p = 1 every fused late prediction is exactly one modality's.
    model.cfg.modality_dropout = 1.0
    audio, video = batch(6)
    for training in (True, False):
        out = model.train(training)(audio, video)
        la, lv = (F.log_softmax(out.per_modality[m], -1) for m in ("a", "v"))
        single = torch.isclose(out.logits, la, atol=1e-6).all(-1) ^ torch.isclose(out.logits, lv, atol=1e-6).all(-1)
        assert single.all() if training else not single.any()


def test_concat_embedding_appends_the_backbones_cls_output_to_the_pooled_features(cls_backbone):
    """concat_embedding: features = [pooling of the tokens, the backbone's pooled embedding] (the
    CLS output with CLS tokens; the joint pass's fused embedding in joint AV); the head widens by D."""
    dim = cls_backbone.config.hidden_size
    audio, video = batch(3)
    with torch.no_grad():
        alone = cls_backbone(audio=audio)
        joint = cls_backbone(audio=audio, video=video)
    assert torch.allclose(alone.audio_embeds, alone.audio_last_hidden_state[:, 0])  # the CLS output
    for fusion, pooling in (("late", "asp"), ("joint", "mean"), ("dca", "mean")):
        model = TaskModel(copy.deepcopy(cls_backbone), head("emotion", fusion=fusion, pooling=pooling,
                                                            concat_embedding=True, feature_norm="none")).eval()
        branch = "shared" if fusion == "joint" else "audio"
        head_in = model.heads["shared" if fusion != "late" else "audio"].classifier.in_features
        assert head_in == model.pools[branch].out_dim + dim
        # A batch without video: the video path gives zero features of the widened size.
        with torch.no_grad():
            no_video = model(audio, None)
        assert all(torch.isfinite(t).all() for t in (no_video.logits, *no_video.per_modality.values()))
        if fusion == "dca":
            continue  # DCA pools its own fused tokens; the width check above is what differs
        with torch.no_grad():
            got_a = model.embed(audio, video, mode="a")
            pooled = model.pools[branch](alone.audio_last_hidden_state, alone.audio_token_mask)
            assert torch.allclose(got_a, F.normalize(torch.cat([pooled, alone.audio_embeds], -1), dim=-1), atol=1e-5)
            if fusion == "joint":
                mask = torch.cat([joint.audio_token_mask, joint.video_token_mask], 1)
                pooled = model.pools["shared"](joint.last_hidden_state, mask)
                expected = F.normalize(torch.cat([pooled, joint.fused_embeds], -1), dim=-1)
                assert torch.allclose(model.embed(audio, video, mode="av"), expected, atol=1e-5)


def test_learned_late_weights_are_a_renormalized_weighted_mean_trained_by_the_av_loss(backbone):
    """late_weights=learned: AV = softmax(logits)-weighted mean over present modalities (zeros = the
    plain mean), for log-probs, speaker cosine logits and embeddings; the AV loss moves the weights
    towards the modality that predicts the labels better."""
    audio, video = batch(4)
    has_audio, has_video = flags(1, 1, 0, 1), flags(1, 0, 1, 1)
    for task in ("emotion", "speaker"):
        equal = TaskModel(copy.deepcopy(backbone), head(task, fusion="late")).eval()
        learned = TaskModel(copy.deepcopy(backbone), head(task, fusion="late", late_weights="learned")).eval()
        learned.load_state_dict(equal.state_dict(), strict=False)
        assert learned.late_weights().tolist() == [0.5, 0.5]
        assert torch.allclose(learned(audio, video, has_audio, has_video).logits, equal(audio, video, has_audio, has_video).logits)
        with torch.no_grad():
            learned.late_logits.copy_(torch.tensor([0.0, math.log(3.0)]))  # weights 1/4, 3/4
        out = learned(audio, video, has_audio, has_video)
        if task == "emotion":
            la, lv = (F.log_softmax(out.per_modality[m], -1) for m in ("a", "v"))
        else:
            head_a, head_v = learned.heads["audio"], learned.heads["video"]
            la = head_a.aam.scale * head_a.aam.cosine(learned.embed(audio, video, has_audio, has_video, mode="a"))
            lv = head_v.aam.scale * head_v.aam.cosine(learned.embed(audio, video, has_audio, has_video, mode="v"))
            fused = F.normalize(0.25 * out.per_modality["a"] + 0.75 * out.per_modality["v"], dim=-1)
            assert torch.allclose(out.embeddings[[0, 3]], fused[[0, 3]], atol=1e-5)
        assert torch.allclose(out.logits[[0, 3]], (0.25 * la + 0.75 * lv)[[0, 3]], atol=1e-4)
        assert torch.allclose(out.logits[1], la[1], atol=1e-5) and torch.allclose(out.logits[2], lv[2], atol=1e-5)
    # Trained on labels only video can predict (audio is noise), the weight moves to video.
    torch.manual_seed(0)
    model = TaskModel(copy.deepcopy(backbone), head("emotion", fusion="late", late_weights="learned", co_learning=False, freeze_backbone=True))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    (group,) = [g for g in model.param_groups(0.0) if any(p is model.late_logits for p in g["params"])]
    assert group["lr_scale"] == 100.0 and group["weight_decay"] == 0.0 and len(group["params"]) == 1
    labels = torch.arange(8) % 6
    g = torch.Generator().manual_seed(1)
    video = torch.randn(6, VFRAMES, 3, SIZE, SIZE, generator=g)[labels]  # one fixed clip per class
    for _ in range(30):
        audio = torch.randn(8, FRAMES, MELS, generator=g)
        loss = model.train()(audio, video, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert model.late_weights()[1] > 0.6


@pytest.mark.parametrize("fusion", ["joint", "late"])
def test_learned_layer_weights_mix_every_layer_normalized_state(backbone, fusion):
    """layer_weights=learned (SUPERB): the head reads sum_l softmax(w)_l LayerNorm(h_l) over the
    embedding output and every layer, one weight vector per branch in its own optimizer group; the
    backbone's own embedding (concat_embedding) stays its CLS / pooled output."""
    audio, video = batch(3)
    model = TaskModel(copy.deepcopy(backbone), head("emotion", fusion=fusion, pooling="mean", feature_norm="none",
                                                    layer_weights="learned", concat_embedding=True)).eval()
    depth = len(model.backbone.layers)
    branches = ("audio", "video") if fusion == "late" else ("shared",)
    assert set(model.layer_logits) == set(branches)
    branch = branches[0]
    assert torch.allclose(model.layer_weights(branch), torch.full((depth + 1,), 1.0 / (depth + 1)))
    with torch.no_grad():
        model.layer_logits[branch].copy_(torch.linspace(-1.0, 2.0, depth + 1))
        out = model.backbone(audio=audio, output_hidden_states=True)
        assert len(out.hidden_states) == depth + 1
        w = torch.softmax(torch.linspace(-1.0, 2.0, depth + 1), 0)
        mixed = sum(wl * F.layer_norm(h, h.shape[-1:]) for wl, h in zip(w, out.hidden_states))
        pooled = model.pools[branch](mixed, out.audio_token_mask)
        expected = F.normalize(torch.cat([pooled, out.audio_embeds], -1), dim=-1)
        assert torch.allclose(model.embed(audio, video, mode="a"), expected, atol=1e-5)
    # "last" reads the final (normed) output: the mix is a different input.
    last = TaskModel(copy.deepcopy(backbone), head("emotion", fusion=fusion, pooling="mean", feature_norm="none",
                                                   concat_embedding=True)).eval()
    assert last.layer_logits is None and last.layer_weights(branch) is None
    with torch.no_grad():
        assert not torch.allclose(last.embed(audio, video, mode="a"), expected, atol=1e-3)
    # Own group at head_lr_scale x layer_weights_lr_scale; every trainable parameter once.
    model = TaskModel(copy.deepcopy(backbone), head("emotion", fusion=fusion, layer_weights="learned",
                                                    layer_weights_lr_scale=50.0, head_lr_scale=2.0, freeze_backbone=True))
    groups = model.param_groups(0.05)
    (group,) = [g for g in groups if any(p is model.layer_logits[branch] for p in g["params"])]
    assert group["lr_scale"] == 100.0 and group["weight_decay"] == 0.0 and len(group["params"]) == len(branches)
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters() if p.requires_grad)
    # The loss trains the weights.
    model.train()(audio, video, labels=torch.tensor([0, 1, 2])).loss.backward()
    assert all(model.layer_logits[b].grad is not None and model.layer_logits[b].grad.abs().sum() > 0 for b in branches)


def test_segment_consistency_compares_the_clips_ends_each_encoded_alone(cls_backbone):
    """segment_consistency [audio]: every mode's features end with |first - last| and cos(first, last) of
    the patch means of the first and last thirds of the audio, each encoded alone (the middle third is never
    read); modes without audio and samples without audio get zeros there. The head widens by D + 1."""
    dim = cls_backbone.config.hidden_size
    audio, video = batch(3)
    has_audio, has_video = flags(1, 1, 0), flags(1, 1, 1)
    audio[2] = 0.0
    # By hand: the first and the last two of the seven patch columns (98 frames, the last column
    # padded), in separate passes.
    assert cls_backbone.embeddings.audio_grid(audio) == (MELS // 16, 7)
    ends = end_segments("audio", 3, (MELS // 16, 7), 1 / 3)
    means = []
    with torch.no_grad():
        for rows in (slice(0, 3), slice(3, 6)):
            view = ModalityMask(ids_keep=ends.ids_keep[rows], keep_valid=None, mask=ends.mask[rows])
            out = cls_backbone(audio=audio, has_audio=has_audio, audio_mask=view)
            means.append(out.audio_last_hidden_state[:, 1:].mean(1))  # the patch outputs, no CLS
    first, last = means
    expected = torch.cat([(first - last).abs(), F.cosine_similarity(first, last, dim=-1)[:, None]], -1)
    expected[2] = 0.0
    for fusion in ("late", "joint"):
        cfg = head("spoof", fusion=fusion, pooling="asp", segment_consistency=["audio"], feature_norm="none")
        model = TaskModel(copy.deepcopy(cls_backbone), cfg).eval()
        branch = "shared" if fusion == "joint" else "audio"
        assert model.heads[branch].classifier.in_features == model.pools[branch].out_dim + dim + 1
        with torch.no_grad():
            results = model._compute(model._inputs(audio, video, has_audio, has_video), ("av", "a", "v"))
        # (Late fusion's "av" features are the mean of its heads' inputs, not one head's input.)
        for mode in ("av", "a") if fusion == "joint" else ("a",):
            assert torch.allclose(results[mode].features[:, -(dim + 1):], expected, atol=1e-5), (fusion, mode)
        assert torch.equal(results["v"].features[:, -(dim + 1):], torch.zeros(3, dim + 1))
        # Audio between the ends moves the pooled tokens, never the comparison of the ends.
        middle = audio.clone()
        middle[:, 2 * 16 : 5 * 16] = torch.randn(3, 48, MELS)
        with torch.no_grad():
            moved = model._compute(model._inputs(middle, video, has_audio, has_video), ("a",))["a"].features
        assert torch.allclose(moved[:2, -(dim + 1):], expected[:2], atol=1e-5)
        assert not torch.allclose(moved[:2, : -(dim + 1)], results["a"].features[:2, : -(dim + 1)], atol=1e-4)
    # Full finetuning trains the backbone through the end views too.
    model = TaskModel(copy.deepcopy(cls_backbone), head("spoof", fusion="late", segment_consistency=["audio"]))
    model.train()
    features = model.end_segment_features("audio", audio, has_audio)
    features.sum().backward()
    assert model.backbone.layers[0].attention.qkv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("fusion", ["joint", "late", "dca"])
def test_missing_modality_samples_use_their_present_modality(backbone, fusion):
    """Samples lacking a modality give finite outputs and the fused prediction equals the present modality's path."""
    audio, video = batch(4)
    has_audio, has_video = flags(1, 1, 0, 0), flags(1, 0, 1, 0)  # AV, audio only, video only, nothing
    video[1] = 0.0  # absent modalities come zero-filled from the loader
    audio[2] = 0.0
    model = TaskModel(backbone, head("emotion", fusion=fusion, pooling="asp")).eval()
    out = model(audio, video, has_audio, has_video, labels=torch.tensor([0, 1, 2, 3]))
    assert all(torch.isfinite(t).all() for t in (out.loss, out.logits, out.embeddings, *out.per_modality.values()))
    probs = {m: torch.softmax(out.per_modality[m], -1) for m in ("av", "a", "v")}
    atol = 1e-6 if fusion == "late" else 1e-4  # joint: same tokens up to the joint sequence's float rounding
    assert torch.allclose(probs["av"][1], probs["a"][1], atol=atol)
    assert torch.allclose(probs["av"][2], probs["v"][2], atol=atol)
    assert not torch.allclose(probs["av"][0], probs["a"][0], atol=1e-4)  # an AV sample really fuses
    # The absent modality's content is never read.
    video2 = video.clone()
    video2[1] = torch.randn_like(video2[1])
    again = model(audio, video2, has_audio, has_video)
    assert torch.allclose(again.logits[1], out.logits[1], atol=1e-5)
    emb_av = model.embed(audio, video2, has_audio, has_video, mode="av")
    emb_a = model.embed(audio, video2, has_audio, has_video, mode="a")
    assert torch.allclose(emb_av[1], emb_a[1], atol=1e-4)


def test_freeze_backbone_and_param_groups(tiny_backbone):
    """A frozen backbone gets no grads; param groups hold every trainable parameter once with the right lr_scale."""
    audio, video = batch(2)
    frozen = TaskModel(copy.deepcopy(tiny_backbone), head("speaker", freeze_backbone=True, head_lr_scale=3.0))
    frozen.train()
    assert not frozen.backbone.training and frozen.heads.training
    frozen(audio, video, labels=torch.tensor([0, 1])).loss.backward()
    assert all(p.grad is None for p in frozen.backbone.parameters())
    assert all(p.grad is not None for p in frozen.heads.parameters())
    groups = frozen.param_groups(0.05)
    assert {g["lr_scale"] for g in groups} == {3.0}
    trainable = sorted(id(p) for p in frozen.parameters() if p.requires_grad)
    assert sorted(id(p) for g in groups for p in g["params"]) == trainable

    model = TaskModel(copy.deepcopy(tiny_backbone), head("emotion", fusion="dca", head_lr_scale=2.0, layer_decay=0.5))
    groups = model.param_groups(0.05)
    ids = [id(p) for g in groups for p in g["params"]]
    trainable = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    assert len(ids) == len(set(ids)) and set(ids) == set(trainable)
    depth = len(model.backbone.layers)
    for g in groups:
        for p in g["params"]:
            name = trainable[id(p)]
            if name.startswith("backbone."):
                lid = layer_id(name[len("backbone."):], "", depth)
                assert g["lr_scale"] == pytest.approx(0.5 ** (depth + 1 - lid)), name
            else:
                assert g["lr_scale"] == 2.0 and (g["weight_decay"] > 0) == (p.ndim >= 2), name


@pytest.mark.parametrize("task,fusion", [("emotion", "joint"), ("speaker", "late"), ("spoof", "dca")])
def test_a_few_optimizer_steps_reduce_the_loss(backbone, task, fusion):
    """Eight AdamW steps on a fixed tiny batch lower each task's (co-learning) loss."""
    torch.manual_seed(0)
    audio, video = batch(4, seed=1)
    has_audio, has_video = flags(1, 1, 1, 0), flags(1, 0, 1, 1)
    labels = torch.tensor([1, 0, 1, 0]) if task == "spoof" else torch.tensor([0, 1, 2, 3])
    model = TaskModel(backbone, head(task, fusion=fusion, aam_margin=0.1)).train()
    groups = model.param_groups(0.0)
    for g in groups:
        g["lr"] = 1e-3 * g["lr_scale"]
    opt = torch.optim.AdamW(groups)
    losses = []
    for _ in range(8):
        loss = model(audio, video, has_audio, has_video, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_spoof_score_is_higher_for_bona_fide_after_overfitting(backbone):
    """Trained on is_spoof labels, the score (bona fide probability) ranks bona fide above spoof."""
    torch.manual_seed(0)
    audio, _ = batch(6, seed=2)
    is_spoof = torch.tensor([1, 0, 1, 0, 0, 1])
    model = TaskModel(backbone, head("spoof", modalities=["audio"]))
    assert torch.equal(model.targets(is_spoof), 1 - is_spoof) and BONA_FIDE == 1
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(15):
        loss = model(audio, None, labels=is_spoof).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    scores = model.eval().scores(audio, None)
    assert scores.shape == (6,)
    bona, spoof = scores[is_spoof == 0], scores[is_spoof == 1]
    assert bona.min() > spoof.max() and (bona > 0.5).all(), scores


def test_zero_shot_embeddings_are_unit_norm(backbone):
    """Zero-shot embeddings are L2-normalized mean-pooled backbone outputs in every mode; absent rows are 0."""
    backbone.eval()
    audio, video = batch(3)
    has_audio, has_video = flags(1, 1, 0), flags(1, 0, 1)
    for mode in ("a", "v", "av"):
        emb = zero_shot_embeddings(backbone, audio, video, mode=mode)
        assert emb.shape == (3, 192) and torch.allclose(emb.norm(dim=-1), torch.ones(3), atol=1e-5), mode
    expected = F.normalize(backbone.encode_audio(audio))
    assert torch.allclose(zero_shot_embeddings(backbone, audio, video, mode="a"), expected, atol=1e-5)
    joint = zero_shot_embeddings(backbone, audio, video, has_audio, has_video, mode="av", joint=True)
    assert torch.allclose(joint.norm(dim=-1), torch.ones(3), atol=1e-5)
    # An audio-only sample's AV embedding is its audio embedding.
    av = zero_shot_embeddings(backbone, audio, video, has_audio, has_video, mode="av")
    a = zero_shot_embeddings(backbone, audio, video, mode="a")
    assert torch.allclose(av[1], a[1], atol=1e-5) and not torch.allclose(av[0], a[0], atol=1e-3)
    assert torch.equal(zero_shot_embeddings(backbone, audio, None, mode="av"), a)  # no video tensor: audio only
    none = zero_shot_embeddings(backbone, audio, video, flags(0, 0, 0), flags(0, 0, 0), mode="av")
    assert torch.equal(none, torch.zeros(3, 192))
