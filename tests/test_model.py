"""AVViT: shapes, masking, modality handling, HF integration, ViT init, objectives, config, bench."""

from __future__ import annotations

import json
import math
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from avssl.config import ConfigError, validate
from avssl.pretrain import modeling, objective, registry
from avssl.pretrain.configuration import AVViTConfig
from avssl.pretrain.modeling import AVViTForPretraining, AVViTModel
from avssl.pretrain.bench import bench_model, layer_flops, pretraining_flops
from avssl.pretrain.config import LossConfig, MaskingConfig, ModelConfig, avvit_config_from_sections, build_model
from avssl.pretrain.init_from_vit import load_vit_weights
from avssl.pretrain.lr_decay import param_groups_lrd
from avssl.pretrain.masking import (
    ModalityMask,
    audio_halves,
    end_segments,
    mask_audio,
    mask_video,
    num_masked,
    ratios_per_sample,
    video_halves,
)


def small_config(**overrides) -> AVViTConfig:
    """2-layer 32-d model; audio 48 frames x 32 mel bins (2 x 3 patches), video 2 frames of 32x32 (8 patches)."""
    kwargs = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        audio_num_mel_bins=32,
        audio_num_frames=48,
        video_image_size=32,
        video_num_frames=2,
        decoder_hidden_size=32,
        decoder_num_hidden_layers=1,
        decoder_num_attention_heads=2,
        decoder_intermediate_size=64,
    )
    kwargs.update(overrides)
    return AVViTConfig(**kwargs)


def batch(b: int = 4, frames: int = 48, mels: int = 32, v: int = 2, size: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, frames, mels, generator=g), torch.randn(b, v, 3, size, size, generator=g)


def pretraining_model(masking: dict | None = None, loss: dict | None = None, **overrides) -> AVViTForPretraining:
    """The small model with the objective that the masking and loss sections describe."""
    return AVViTForPretraining(
        small_config(**overrides), MaskingConfig.model_validate(masking or {}), LossConfig.model_validate(loss or {})
    )


# ---------------------------------------------------------------- sizes and shapes


def test_registry_parameter_counts_match_vit_sizes():
    """Registered archs have ViT-Ti/S/B/L-sized encoders (counted on the meta device, nothing allocated)."""
    expected = {
        "avvit_tiny_patch16": (1.5e6, 3e6),
        "avvit_small_patch16": (21e6, 23e6),
        "avvit_base_patch16": (85e6, 88e6),  # ViT-B/16 backbone: 85.8M
        "avvit_large_patch16": (302e6, 306e6),  # ViT-L/16 backbone: 303.3M
    }
    for arch, (low, high) in expected.items():
        config = registry.avvit_config(arch)
        assert config.hidden_size == registry.ARCHITECTURES[arch].hidden_size
        with torch.device("meta"):
            model = AVViTModel(config)
        n = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert low < n < high, (arch, n)
    base = registry.avvit_base_patch16()
    assert (base.hidden_size, base.num_hidden_layers, base.num_attention_heads) == (768, 12, 12)
    assert (base.decoder_hidden_size, base.decoder_num_hidden_layers) == (512, 8)


def test_tiny_arch_shapes_in_each_mode():
    """Tiny arch gives the documented shapes for audio-only, video-only and audio-visual input from one model."""
    config = registry.avvit_tiny_patch16(audio_num_frames=32, video_image_size=32, attn_implementation="sdpa")
    model = AVViTModel(config).eval()
    audio, video = batch(3, frames=32, mels=128, v=1, size=32)
    la, lv = 8 * 2, 1 * 2 * 2
    with torch.no_grad():
        a = model(audio=audio)
        v = model(video=video)
        av = model(audio=audio, video=video, output_hidden_states=True, output_layers=[0, -1])
    assert a.last_hidden_state.shape == (3, la, 192) and a.video_embeds is None
    assert a.audio_embeds.shape == (3, 192) and torch.allclose(a.fused_embeds, a.audio_embeds)
    assert v.last_hidden_state.shape == (3, lv, 192) and v.audio_embeds is None
    assert av.last_hidden_state.shape == (3, la + lv, 192)
    assert av.audio_last_hidden_state.shape == (3, la, 192) and av.video_last_hidden_state.shape == (3, lv, 192)
    assert len(av.hidden_states) == config.num_hidden_layers + 1
    assert len(av.intermediate_hidden_states) == 2
    assert torch.equal(av.intermediate_hidden_states[1], av.hidden_states[-1])
    assert torch.allclose(av.fused_embeds, (av.audio_embeds + av.video_embeds) / 2, atol=1e-6)


def test_base_shaped_pretraining_forward():
    """A base-width (768-d, 12 heads) model, shrunk to 2 layers, runs the full pretraining step with the documented output fields."""
    config = registry.avvit_base_patch16(
        num_hidden_layers=2,
        decoder_num_hidden_layers=1,
        audio_num_mel_bins=32,
        audio_num_frames=48,
        video_image_size=32,
        video_num_frames=1,
        attn_implementation="sdpa",
    )
    model = AVViTForPretraining(config)
    audio, video = batch(2, v=1)
    out = model(audio=audio, video=video)
    assert out.pred_audio.shape == (2, 6, 256) and out.pred_video.shape == (2, 4, 768)
    assert out.audio_embeds.shape == (2, 768) and out.audio_mask.shape == (2, 6)
    for name in ("loss", "loss_rec_audio", "loss_rec_video", "loss_contrastive", "contrastive_accuracy", "temperature", "n_pairs"):
        assert out[name].ndim == 0 and torch.isfinite(out[name]), name
    assert out.n_pairs.item() == 2 and math.isclose(out.temperature.item(), 0.05, rel_tol=1e-6)


def test_audio_time_padding_and_position_resizing():
    """Audio is zero-padded to the time patch grid and runs at other lengths/sizes with sin-cos or learned positions."""
    for pos in ("sincos", "learned"):
        config = small_config(pos_embed_type=pos, audio_time_stride=8)
        model = AVViTModel(config).eval()
        assert config.audio_grid(48) == (2, 5) and config.audio_padded_frames(45) == 48
        with torch.no_grad():
            out = model(audio=torch.randn(2, 45, 32))  # not on the grid: padded to 48
            longer = model(audio=torch.randn(2, 100, 32), video=torch.randn(2, 3, 3, 48, 64))
        assert out.audio_last_hidden_state.shape[1] == 10
        assert longer.audio_last_hidden_state.shape[1] == 2 * config.audio_grid(100)[1]
        assert longer.video_last_hidden_state.shape[1] == 3 * 3 * 4
        assert torch.isfinite(longer.last_hidden_state).all()
    # Fixed sin-cos recomputed for a longer grid agrees with the stored one on the shared prefix of columns.
    emb = model.embeddings.positions.audio
    stored = modeling.sincos_position_embedding(32, (2, 5))
    grown = modeling.sincos_position_embedding(32, (2, 7)).view(2, 7, 32)[:, :5].reshape(10, 32)
    assert torch.allclose(stored, grown)
    assert emb(emb.grid).shape == (1, 10, 32)


# ---------------------------------------------------------------- masking


def test_mask_ratio_is_exact_and_keep_mask_are_complementary():
    """Each sample masks exactly round(r*L) tokens; kept indices are distinct and exactly the unmasked ones."""
    for mode in ("unstructured", "time", "frequency", "tf_block"):
        for ratio in (0.0, 0.3, 0.75, 0.9):
            m = mask_audio(5, (8, 13), [ratio], mode, (2, 2))
            n_mask = round(ratio * 104)
            assert (m.mask.sum(1) == n_mask).all(), (mode, ratio)
            assert m.ids_keep.shape == (5, 104 - n_mask) and m.keep_valid is None
            for b in range(5):
                kept = m.ids_keep[b]
                assert kept.unique().numel() == kept.numel()
                assert not m.mask[b, kept].any() and m.mask[b].sum() + kept.numel() == 104
    assert num_masked(0.999, 10) == 9  # never masks everything


def test_masking_modes_produce_structured_patterns():
    """time masks whole columns, frequency whole rows, tf_block whole blocks, tube the same places in every frame."""
    torch.manual_seed(0)
    nf, nt = 8, 12
    time_mask = mask_audio(4, (nf, nt), [0.5], "time").mask.view(4, nf, nt)
    assert (time_mask == time_mask[:, :1, :]).all() and (time_mask[:, 0].sum(1) == 6).all()
    freq_mask = mask_audio(4, (nf, nt), [0.25], "frequency").mask.view(4, nf, nt)
    assert (freq_mask == freq_mask[:, :, :1]).all() and (freq_mask[:, :, 0].sum(1) == 2).all()
    block = mask_audio(4, (nf, nt), [0.5], "tf_block", (2, 3)).mask.view(4, nf // 2, 2, nt // 3, 3)
    per_block = block.sum(dim=(2, 4))  # (B, 4, 4) masked tokens per 2x3 block
    assert ((per_block == 0) | (per_block == 6)).all() and (per_block == 6).sum() == 4 * 8
    # A count that is not a whole number of units: at most one unit is partial.
    partial = mask_audio(4, (nf, nt), [0.3], "time").mask.view(4, nf, nt).sum(1)  # (B, nt) masked per column
    assert (((partial > 0) & (partial < nf)).sum(1) <= 1).all()
    tube = mask_video(3, (4, 3, 3), [5 / 9], "tube").mask.view(3, 4, 9)  # 20 tokens = 5 whole tubes
    assert (tube == tube[:, :1]).all()
    random_unstructured = mask_audio(1, (nf, nt), [0.5], "unstructured").mask.view(nf, nt)
    assert not (random_unstructured == random_unstructured[:1]).all()


def test_several_ratios_form_subbatches_with_padding():
    """AVSiam-style ratio lists are assigned to contiguous sub-batches; visible counts differ and padding is marked."""
    assert ratios_per_sample(7, [0.0, 0.5, 0.8]) == [0.0, 0.0, 0.0, 0.5, 0.5, 0.8, 0.8]
    m = mask_audio(6, (2, 5), [0.0, 0.5, 0.8], "unstructured")
    assert m.ids_keep.shape == (6, 10)
    assert m.keep_valid.sum(1).tolist() == [10, 10, 5, 5, 2, 2]
    assert m.mask.sum(1).tolist() == [0, 0, 5, 5, 8, 8]


def test_masked_patches_never_reach_the_encoder():
    """NaN written into every masked patch (audio and video) leaves the encoder output finite, and only visible tokens enter."""
    model = AVViTModel(small_config(separate_modality_norms=True)).eval()
    audio, video = batch(4)
    torch.manual_seed(1)
    a_mask = mask_audio(4, (2, 3), [0.0, 0.5], "unstructured")  # padded sub-batches
    v_mask = mask_video(4, (2, 2, 2), [0.5], "random")
    seen = []
    model.layers[0].register_forward_pre_hook(lambda mod, args, kw: seen.append(args[0].shape[1]), with_kwargs=True)
    emb = model.embeddings
    audio_nan = emb.patchify_audio(audio)
    audio_nan[a_mask.mask] = float("nan")
    audio_nan = F.fold(audio_nan.transpose(1, 2), output_size=(32, 48), kernel_size=16, stride=16)  # (B, 1, F, T)
    audio_nan = audio_nan.squeeze(1).transpose(1, 2)
    video_nan = video.clone().view(4, 2, 3, 2, 16, 2, 16)  # (B, V, C, h, p, w, p)
    vm = v_mask.mask.view(4, 2, 2, 2)
    video_nan.permute(0, 1, 3, 5, 2, 4, 6)[vm] = float("nan")
    video_nan = video_nan.view(4, 2, 3, 32, 32)
    assert torch.isnan(audio_nan).any() and torch.isnan(video_nan).any()
    with torch.no_grad():
        out = model(audio=audio_nan, video=video_nan, audio_mask=a_mask, video_mask=v_mask)
    assert torch.isfinite(out.last_hidden_state).all()
    assert seen == [6 + 4]  # 6 audio slots (largest visible count) + 4 visible video tokens
    assert torch.isfinite(out.audio_embeds).all() and torch.isfinite(out.video_embeds).all()


# ---------------------------------------------------------------- modalities and padding


def test_gradients_from_each_modality_reach_shared_weights():
    """Audio-only and video-only reconstruction losses each give gradients on the shared attention and MLP."""
    for modality in ("audio", "video"):
        torch.manual_seed(0)
        model = pretraining_model()
        audio, video = batch(2)
        out = model(**{modality: audio if modality == "audio" else video})
        out.loss.backward()
        layer = model.avvit.layers[0]
        for param in (layer.attention.qkv.weight, layer.mlp.fc1.weight):
            assert param.grad is not None and param.grad.abs().sum() > 0, modality
        own = model.avvit.embeddings.audio_patch_embed if modality == "audio" else model.avvit.embeddings.video_patch_embed
        other = model.avvit.embeddings.video_patch_embed if modality == "audio" else model.avvit.embeddings.audio_patch_embed
        assert own.weight.grad.abs().sum() > 0 and other.weight.grad is None
        assert getattr(layer.norm1, modality).weight.grad.abs().sum() > 0


@pytest.mark.parametrize("use_cls", [False, True])
def test_mixed_batch_matches_single_modality_runs(use_cls):
    """In a mixed batch each sample's embeddings equal those of running it alone in its own mode (padding is inert)."""
    model = AVViTModel(small_config(use_cls_token=use_cls)).eval()
    audio, video = batch(3)
    has_audio = torch.tensor([True, True, False])
    has_video = torch.tensor([True, False, True])
    audio = audio * has_audio[:, None, None]  # absent modalities are zero-filled
    video = video * has_video[:, None, None, None, None]
    with torch.no_grad():
        mixed = model(audio=audio, video=video, has_audio=has_audio, has_video=has_video)
        av = model(audio=audio[:1], video=video[:1])
        a = model(audio=audio[1:2])
        v = model(video=video[2:3])
    tol = dict(atol=1e-5, rtol=1e-4)
    assert torch.allclose(mixed.audio_embeds[0], av.audio_embeds[0], **tol)
    assert torch.allclose(mixed.fused_embeds[0], av.fused_embeds[0], **tol)
    assert torch.allclose(mixed.audio_embeds[1], a.audio_embeds[0], **tol)
    assert torch.allclose(mixed.fused_embeds[1], a.audio_embeds[0], **tol)
    assert torch.allclose(mixed.video_embeds[2], v.video_embeds[0], **tol)
    assert torch.allclose(mixed.fused_embeds[2], v.video_embeds[0], **tol)
    assert (mixed.video_embeds[1] == 0).all() and (mixed.audio_embeds[2] == 0).all()
    assert mixed.audio_token_mask[2].sum() == 0 and mixed.video_token_mask[0].all()
    # Audio-only pass where sample 2 has no audio: no fully masked attention row (SDPA would give NaN).
    with torch.no_grad():
        lone = model(audio=audio, has_audio=has_audio)
    assert torch.isfinite(lone.last_hidden_state).all() and (lone.audio_embeds[2] == 0).all()
    assert torch.allclose(lone.audio_embeds[1], a.audio_embeds[0], **tol)
    mask = modeling.key_padding_mask([torch.tensor([[True, False], [False, False]]), torch.zeros(2, 1, dtype=torch.bool)])
    assert mask.shape == (2, 1, 1, 3) and mask.any(dim=-1).all()  # every row attends to something


def test_variable_visible_counts_do_not_change_a_sample():
    """With several mask ratios in a batch, a sample's output equals running it alone with its own mask."""
    model = AVViTModel(small_config()).eval()
    audio, _ = batch(4)
    torch.manual_seed(3)
    m = mask_audio(4, (2, 3), [0.0, 0.5], "unstructured")
    with torch.no_grad():
        together = model(audio=audio, audio_mask=m).audio_embeds
        for b in (0, 3):
            n = int(m.keep_valid[b].sum())
            alone_mask = ModalityMask(ids_keep=m.ids_keep[b : b + 1, :n], keep_valid=None, mask=m.mask[b : b + 1])
            alone = model(audio=audio[b : b + 1], audio_mask=alone_mask).audio_embeds
            assert torch.allclose(together[b], alone[0], atol=1e-5, rtol=1e-4)


def test_pretraining_without_pairs_keeps_every_parameter_in_the_graph():
    """A batch with no audio-visual pair trains reconstruction, gives contrastive 0 and still reaches every parameter
    (the learned temperature and the projection heads included)."""
    model = pretraining_model(loss={"learn_temperature": True, "projection": "mlp"})
    audio, video = batch(3)
    has_audio = torch.tensor([True, True, False])
    has_video = torch.tensor([False, False, True])
    out = model(audio=audio, video=video * has_video[:, None, None, None, None], has_audio=has_audio, has_video=has_video)
    assert out.n_pairs.item() == 0 and out.loss_contrastive.item() == 0.0
    assert out.loss_rec_audio.item() > 0 and out.loss_rec_video.item() > 0
    out.loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    # Audio-only run (no video at all): only audio reconstruction, no contrastive view.
    only = model(audio=audio)
    assert only.loss_rec_video.item() == 0.0 and only.audio_embeds is None and torch.isfinite(only.loss)


def test_masked_batch_norm_uses_only_valid_rows():
    """Statistics come from the valid rows alone: those are standardized exactly, and an invalid outlier row changes nothing."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, generator=g) * 3.0 + 7.0
    valid = torch.tensor([True, True, False, True, True, False])
    x_outlier = x.clone()
    x_outlier[2] = 1e6
    y = objective.masked_batch_norm(x, valid)
    ref = F.batch_norm(x[valid], None, None, training=True, eps=1e-5)
    assert torch.allclose(y[valid], ref, atol=1e-5)
    assert torch.allclose(objective.masked_batch_norm(x_outlier, valid)[valid], y[valid])
    one = torch.tensor([True, False, False, False, False, False])
    assert torch.equal(objective.masked_batch_norm(x, one), x)  # no statistics from one row


def test_projection_head_centres_the_contrastive_view_and_is_not_released(tmp_path):
    """With projection=mlp the loss reads per-batch standardized projections (pooled cosines near 1 are no longer near 1),
    every head parameter gets a gradient, and the saved backbone (what a release holds) has no head weights."""
    torch.manual_seed(0)
    model = pretraining_model(loss={"contrastive_weight": 1.0, "projection": "mlp", "projection_dim": 16})
    audio, video = batch(4)
    out = model(audio=audio, video=video)
    out.loss.backward()
    heads = {n: p for n, p in model.named_parameters() if "projection" in n}
    assert heads and all(p.grad is not None and p.grad.abs().sum() > 0 for p in heads.values())
    proj = model.objective.audio_projection(out.audio_embeds.detach(), torch.ones(4, dtype=torch.bool))
    assert proj.shape == (4, 16) and torch.allclose(proj.mean(0), torch.zeros(16), atol=1e-5)
    model.avvit.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    saved = load_file(next(tmp_path.glob("*.safetensors")))
    assert not [k for k in saved if "projection" in k]
    with pytest.raises(ConfigError):
        validate(LossConfig, {"projection": "linear"}, "loss")


def test_segment_halves_are_disjoint_in_time_and_equal_in_size():
    """Audio: the first and last floor(nt/2) patch columns of every frequency row (an odd middle column in neither);
    video: the first and last floor(V/2) frames. Rows 0..B-1 hold the first half, B..2B-1 the second."""
    m = audio_halves(2, (2, 5))  # tokens f * 5 + t
    assert m.ids_keep.tolist() == [[0, 1, 5, 6], [0, 1, 5, 6], [3, 4, 8, 9], [3, 4, 8, 9]]
    assert m.keep_valid is None and torch.equal(m.mask.sum(1), torch.tensor([6, 6, 6, 6]))
    keep = ~m.mask
    assert not (keep[0] & keep[2]).any() and torch.equal(keep.gather(1, m.ids_keep), torch.ones(4, 4, dtype=torch.bool))
    v = video_halves(1, (3, 1, 2))  # frames of 2 tokens
    assert v.ids_keep.tolist() == [[0, 1], [4, 5]]
    with pytest.raises(ValueError, match="cannot be split in time"):
        video_halves(1, (1, 2, 2))


def test_end_segments_take_the_first_and_last_share_of_time_steps():
    """end_segments(fraction): the first and last max(1, floor(fraction * steps)) time steps; 0.5 is the halves."""
    m = end_segments("audio", 1, (2, 6), 1 / 3)  # tokens f * 6 + t; thirds = 2 columns, the middle 2 in neither
    assert m.ids_keep.tolist() == [[0, 1, 6, 7], [4, 5, 10, 11]]
    assert torch.equal(end_segments("audio", 2, (2, 5), 0.5).ids_keep, audio_halves(2, (2, 5)).ids_keep)
    assert end_segments("video", 1, (4, 1, 2), 1 / 3).ids_keep.tolist() == [[0, 1], [6, 7]]  # one frame each
    assert end_segments("audio", 1, (1, 2), 0.1).ids_keep.tolist() == [[0], [1]]  # at least one step
    for bad in (0.0, 0.6):
        with pytest.raises(ValueError, match="fraction"):
            end_segments("audio", 1, (2, 6), bad)


def test_segment_contrast_trains_its_own_heads_and_is_not_released(tmp_path):
    """segment_weight > 0 adds a half-vs-half InfoNCE per modality: finite, in the loss, reaching the backbone and its
    own projection heads (released without them); a sample lacking a modality is no pair of that modality."""
    torch.manual_seed(0)
    model = pretraining_model(loss={"segment_weight": 1.0, "projection": "mlp", "projection_dim": 16})
    audio, video = batch(4)
    has_video = torch.tensor([True, True, True, False])
    out = model(audio=audio, video=video, has_video=has_video)
    assert out.loss_segment.item() > 0 and torch.isfinite(out.loss_segment) and 0 <= out.segment_accuracy.item() <= 1
    expected = out.loss_reconstruction + 0.01 * out.loss_contrastive + out.loss_segment
    assert torch.allclose(out.loss, expected)
    out.loss.backward()
    for name in ("audio_segment_projection", "video_segment_projection"):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in getattr(model.objective, name).parameters())
    assert model.avvit.embeddings.audio_patch_embed.weight.grad.abs().sum() > 0
    model.avvit.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    assert not [k for k in load_file(next(tmp_path.glob("*.safetensors"))) if "projection" in k]
    # Off by default: no heads, zero loss; on without a projection head: the pooled embeddings themselves.
    plain = pretraining_model()
    assert not hasattr(plain.objective, "audio_segment_projection") and plain(audio=audio, video=video).loss_segment.item() == 0.0
    bare = pretraining_model(loss={"segment_weight": 0.5, "reconstruction_weight": 0.0, "contrastive_weight": 0.0})
    bare_out = bare(audio=audio)  # audio-only run: the audio halves alone
    assert bare_out.loss_segment.item() > 0 and torch.allclose(bare_out.loss, 0.5 * bare_out.loss_segment)
    with pytest.raises(ConfigError, match="all 0"):
        validate(LossConfig, {"reconstruction_weight": 0.0, "contrastive_weight": 0.0}, "loss")


def test_hard_negative_beta_reaches_both_contrasts():
    """loss.hard_negative_beta weights the negatives of the AV and the segment contrast: with the same weights
    and masks, each weighted loss is larger than plain InfoNCE's (the hardest negatives weigh more than the
    mean one), the retrieval accuracies are the same, and reconstruction does not change."""
    losses = {"segment_weight": 1.0, "contrastive_weight": 1.0, "projection": "mlp", "projection_dim": 16}
    torch.manual_seed(0)
    plain = pretraining_model(loss=losses)
    hard = pretraining_model(loss={**losses, "hard_negative_beta": 2.0})
    hard.load_state_dict(plain.state_dict())
    audio, video = batch(6)
    outs = []
    for model in (plain, hard):
        torch.manual_seed(1)  # the same masks
        outs.append(model(audio=audio, video=video))
    base, weighted = outs
    assert weighted.loss_contrastive > base.loss_contrastive and weighted.loss_segment > base.loss_segment
    assert torch.equal(weighted.contrastive_accuracy, base.contrastive_accuracy)
    assert torch.equal(weighted.segment_accuracy, base.segment_accuracy)
    assert torch.allclose(weighted.loss_reconstruction, base.loss_reconstruction)


def test_with_cls_tokens_the_segment_contrast_pools_patches_and_the_cls_output_stays_the_embedding():
    """use_cls_token: the CLS output is the pooled embedding (the AV contrast's and the release's); the segment
    contrast reads the mean of the real patch outputs, so its clip cues shape the patches, not the embedding."""
    torch.manual_seed(0)
    model = pretraining_model(use_cls_token=True, loss={"segment_weight": 1.0}).eval()
    audio, video = batch(3)
    with torch.no_grad():
        out = model.avvit(audio=audio, video=video, has_video=torch.tensor([True, True, False]))
        for name in ("audio", "video"):
            piece, valid = out[f"{name}_last_hidden_state"], out[f"{name}_token_mask"]
            real = valid[:, 1:].float()[..., None]
            expected = (piece[:, 1:] * real).sum(1) / real.sum(1).clamp(min=1.0)
            assert torch.allclose(model.avvit.patch_mean(out, name), expected, atol=1e-6)
            assert torch.allclose(out[f"{name}_embeds"], piece[:, 0] * valid[:, :1])  # the CLS output
        assert model.avvit.patch_mean(out, "video")[2].abs().max() == 0  # no video: nothing to pool
        assert model(audio=audio, video=video).loss_segment.item() > 0


# ---------------------------------------------------------------- Hugging Face integration


def test_save_and_load_round_trip_with_auto_classes(tmp_path):
    """save_pretrained/from_pretrained reproduce the outputs exactly; AutoModel and AutoModelForPreTraining load the directory."""
    from transformers import AutoConfig, AutoModel, AutoModelForPreTraining

    torch.manual_seed(0)
    model = pretraining_model(pos_embed_type="learned", use_cls_token=True).eval()
    audio, video = batch(2)
    model.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).model_type == "avvit"
    loaded = AVViTForPretraining.from_pretrained(tmp_path).eval()
    auto_pre = AutoModelForPreTraining.from_pretrained(tmp_path).eval()
    encoder = AutoModel.from_pretrained(tmp_path).eval()
    assert isinstance(encoder, AVViTModel) and isinstance(auto_pre, AVViTForPretraining)
    with torch.no_grad():
        ref = model.avvit(audio=audio, video=video).last_hidden_state
        for other in (loaded.avvit, auto_pre.avvit, encoder):
            assert torch.equal(other(audio=audio, video=video).last_hidden_state, ref)
        torch.manual_seed(5)
        a = model(audio=audio, video=video)
        torch.manual_seed(5)
        b = loaded(audio=audio, video=video)
    assert torch.equal(a.loss, b.loss)
    # The config is architecture only: the objective's sections belong to the run's recipe.
    saved = json.loads((tmp_path / "config.json").read_text())
    assert not {"pretraining_masking", "pretraining_loss"} & set(saved)


def test_a_checkpoint_with_the_objective_heads_at_the_top_level_still_loads():
    """Weights saved when the projection heads and the temperature sat beside the encoder
    ("audio_projection.*", "logit_scale") load into the objective module, value for value."""
    torch.manual_seed(0)
    loss = {"learn_temperature": True, "projection": "mlp", "projection_dim": 16, "segment_weight": 0.5}
    model = pretraining_model(loss=loss)
    legacy = {k.removeprefix("objective."): v.clone() + 1 for k, v in model.state_dict().items()}
    assert "logit_scale" in legacy and "audio_segment_projection.fc1.weight" in legacy
    fresh = pretraining_model(loss=loss)
    fresh.load_state_dict(legacy)
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, legacy[key.removeprefix("objective.")]), key


def test_eager_and_sdpa_give_the_same_outputs():
    """The eager reference and SDPA agree on a padded mixed batch (key-padding mask and masked views included)."""
    torch.manual_seed(0)
    eager = AVViTModel(small_config(attn_implementation="eager")).eval()
    sdpa = AVViTModel(small_config(attn_implementation="sdpa")).eval()
    sdpa.load_state_dict(eager.state_dict())
    assert eager.config._attn_implementation == "eager" and sdpa.config._attn_implementation == "sdpa"
    audio, video = batch(3)
    kwargs = dict(
        audio=audio,
        video=video,
        has_audio=torch.tensor([True, False, True]),
        has_video=torch.tensor([True, True, False]),
        audio_mask=mask_audio(3, (2, 3), [0.0, 0.5], "unstructured"),
    )
    with torch.no_grad():
        x, y = eager(**kwargs), sdpa(**kwargs)
    assert torch.allclose(x.last_hidden_state, y.last_hidden_state, atol=1e-5, rtol=1e-4)
    assert torch.allclose(x.fused_embeds, y.fused_embeds, atol=1e-5, rtol=1e-4)


def test_custom_registered_attention_is_accepted_and_used(monkeypatch):
    """A name registered with AttentionInterface is accepted as attn_implementation and is the function called."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    monkeypatch.setattr(AttentionInterface, "_global_mapping", dict(AttentionInterface._global_mapping))
    calls = []

    def counting_attention(module, query, key, value, attention_mask, **kwargs):
        calls.append(query.shape)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("avssl_test_attention", counting_attention)
    torch.manual_seed(0)
    custom = AVViTModel(small_config(attn_implementation="avssl_test_attention")).eval()
    reference = AVViTModel(small_config(attn_implementation="eager")).eval()
    reference.load_state_dict(custom.state_dict())
    audio, video = batch(2)
    with torch.no_grad():
        out = custom(audio=audio, video=video).last_hidden_state
        ref = reference(audio=audio, video=video).last_hidden_state
    assert len(calls) == 2 and calls[0] == (2, 2, 6 + 8, 16)  # one call per layer, [B, H, N, Dh]
    assert torch.allclose(out, ref, atol=1e-5)
    with pytest.raises(ValueError):
        AVViTModel(small_config(attn_implementation="not_registered_anywhere"))


def test_triton_attention_is_registered_lazily_from_avssl_kernels(monkeypatch):
    """Requesting "triton" calls avssl.kernels.hf_attention.register_attention() before building; without it the error says what to do."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    monkeypatch.setattr(AttentionInterface, "_global_mapping", dict(AttentionInterface._global_mapping))
    AttentionInterface._global_mapping.pop("triton", None)
    monkeypatch.setitem(sys.modules, "avssl.kernels.hf_attention", types.ModuleType("avssl.kernels.hf_attention"))  # no register_attention
    with pytest.raises(ImportError, match="sdpa"):
        build_model(ModelConfig(arch="avvit_tiny_patch16", attn_implementation="triton", video_image_size=32, audio_num_frames=32))

    fake = types.ModuleType("avssl.kernels.hf_attention")
    registered = []

    def register_attention():
        registered.append(True)
        AttentionInterface.register("triton", sdpa_attention_forward)

    fake.register_attention = register_attention
    monkeypatch.setitem(sys.modules, "avssl.kernels.hf_attention", fake)
    model = build_model(ModelConfig(arch="avvit_tiny_patch16", attn_implementation="triton", video_image_size=32, audio_num_frames=32))
    assert registered == [True] and model.config._attn_implementation == "triton"


def test_init_from_tiny_hf_vit_checkpoint(tmp_path):
    """Weights of a saved HF ViT are mapped (audio patch = RGB mean, bicubic positions) and the video path then equals the ViT."""
    from transformers import ViTConfig, ViTForImageClassification, ViTModel

    torch.manual_seed(0)
    vit_config = ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        image_size=32, patch_size=16, layer_norm_eps=1e-6, num_labels=3,
    )
    ViTForImageClassification(vit_config).save_pretrained(tmp_path / "cls")  # classifier wrapper, legacy keys on disk
    vit = ViTModel.from_pretrained(tmp_path / "cls", add_pooling_layer=False).eval()
    model = AVViTModel(small_config(pos_embed_type="learned", use_cls_token=True, video_num_frames=1)).eval()
    report = load_vit_weights(model, tmp_path / "cls")
    assert "embeddings.positions.audio_modality" in report.kept and "layers.1.attention.qkv.weight" in report.loaded

    rgb = vit.embeddings.patch_embeddings.projection.weight
    assert torch.allclose(model.embeddings.audio_patch_embed.weight, rgb.mean(dim=1, keepdim=True))
    assert torch.equal(model.embeddings.video_patch_embed.weight, rgb)
    attention = vit.layers[1].attention
    qkv = torch.cat([attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight])
    assert torch.equal(model.layers[1].attention.qkv.weight, qkv)
    assert torch.equal(model.layers[0].norm1.audio.weight, vit.layers[0].layernorm_before.weight)
    grid = vit.embeddings.position_embeddings[:, 1:].reshape(1, 2, 2, 32).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(2, 3), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(1, 6, 32)
    assert torch.allclose(model.embeddings.positions.audio.weight, expected, atol=1e-6)

    with torch.no_grad():
        model.embeddings.positions.video_modality.zero_()  # the ViT has no modality embedding
        image = torch.randn(2, 3, 32, 32)
        ours = model(video=image[:, None]).video_last_hidden_state
        theirs = vit(pixel_values=image).last_hidden_state
    assert torch.allclose(ours, theirs, atol=1e-5)

    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    mae_config = ViTMAEConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
        patch_size=16, decoder_hidden_size=16, decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
        decoder_intermediate_size=32,
    )
    mae = ViTMAEForPreTraining(mae_config)
    mae.save_pretrained(tmp_path / "mae")
    load_vit_weights(model, tmp_path / "mae")
    mae_rgb = mae.vit.embeddings.patch_embeddings.projection.weight
    assert torch.allclose(model.embeddings.audio_patch_embed.weight, mae_rgb.mean(dim=1, keepdim=True))
    assert torch.equal(model.layers[0].mlp.fc2.weight, mae.vit.layers[0].mlp.fc2.weight)

    with pytest.raises(ValueError, match="hidden_size"):
        load_vit_weights(AVViTModel(small_config(hidden_size=64, intermediate_size=128, pos_embed_type="learned")), tmp_path / "cls")


# ---------------------------------------------------------------- training


def test_loss_decreases_when_overfitting_a_fixed_batch():
    """Twenty AdamW steps on one small fixed batch lower the total, reconstruction and contrastive losses."""
    torch.manual_seed(0)
    model = pretraining_model(loss={"contrastive_weight": 1.0}).train()
    g = torch.Generator().manual_seed(0)
    # Each sample repeats one random patch everywhere: visible patches determine the masked ones, so
    # reconstruction is learnable within a few steps (i.i.d. noise would only be learnable by memorizing).
    audio = torch.randn(6, 16, 16, generator=g).repeat(1, 3, 2)  # (B, 48 frames, 32 mels)
    video = torch.randn(6, 1, 3, 16, 16, generator=g).repeat(1, 2, 1, 2, 2)  # (B, 2, 3, 32, 32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    history = []
    for _ in range(20):
        out = model(audio=audio, video=video)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        history.append((out.loss.item(), out.loss_reconstruction.item(), out.loss_contrastive.item()))
    first = torch.tensor(history[:4]).mean(0)
    last = torch.tensor(history[-4:]).mean(0)
    assert (last < 0.7 * first).all(), (first, last)


def test_param_groups_cover_every_trainable_parameter_once():
    """Layer-wise decay groups hold each trainable parameter exactly once, decay only matrices, and scale by depth."""
    model = pretraining_model(loss={"learn_temperature": True})
    groups = param_groups_lrd(model, weight_decay=0.05, layer_decay=0.5)
    ids = [id(p) for g in groups for p in g["params"]]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(ids) == len(set(ids)) == len(trainable)
    assert set(ids) == {id(p) for p in trainable}
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert frozen and not {id(p) for p in frozen} & set(ids)  # fixed sin-cos positions stay out

    def group_of(param):
        return next(g for g in groups if any(p is param for p in g["params"]))

    layers = model.avvit.layers
    assert group_of(layers[0].attention.qkv.weight)["weight_decay"] == 0.05
    assert group_of(layers[0].attention.qkv.bias)["weight_decay"] == 0.0
    assert group_of(layers[0].norm1.audio.weight)["weight_decay"] == 0.0
    assert group_of(model.avvit.embeddings.positions.audio_modality)["weight_decay"] == 0.0
    assert group_of(model.objective.logit_scale)["weight_decay"] == 0.0
    assert group_of(model.avvit.embeddings.audio_patch_embed.weight)["lr_scale"] == 0.5**3
    assert group_of(layers[0].mlp.fc1.weight)["lr_scale"] == 0.5**2
    assert group_of(layers[1].mlp.fc1.weight)["lr_scale"] == 0.5
    assert group_of(model.decoder.embed.weight)["lr_scale"] == 1.0


# ---------------------------------------------------------------- config sections


def test_config_sections_reject_impossible_values():
    """Ratios >= 1, untileable mel bins, unknown archs and incoherent switches fail validation with the key named."""
    bad = [
        (MaskingConfig, {"reconstruction": {"audio_ratios": [1.0], "video_ratios": [0.5]}}, "audio_ratios"),
        (MaskingConfig, {"reconstruction": {"audio_ratios": [0.0], "video_ratios": [0.5]}}, "reconstruction ratios"),
        (MaskingConfig, {"contrastive": {"audio_ratios": [], "video_ratios": [0.1]}}, "audio_ratios"),
        (MaskingConfig, {"contrastive": {"audio_ratios": [0.1], "video_ratios": [0.1], "audio_mode": "diagonal"}}, "audio_mode"),
        (ModelConfig, {"audio_num_mel_bins": 100}, "audio_num_mel_bins"),
        (ModelConfig, {"arch": "avvit_huge"}, "unknown architecture"),
        (ModelConfig, {"attn_implementation": "flash"}, "attn_implementation"),
        (ModelConfig, {"init_from": "/x", "pos_embed_type": "sincos"}, "pos_embed_type"),
        (ModelConfig, {"decoder_hidden_size": 100}, "decoder width"),
        (ModelConfig, {"audio_freq_stride": 32}, "strides"),
        (ModelConfig, {"unknown_key": 1}, "unknown key"),
        (LossConfig, {"contrastive_weight": 0.0, "reconstruction_weight": 0.0}, "nothing to train"),
        (LossConfig, {"temperature": 0.0}, "temperature"),
    ]
    for section, tree, needle in bad:
        with pytest.raises(ConfigError, match=needle):
            validate(section, tree, "recipe.yaml")
    ok = validate(MaskingConfig, {"reconstruction": {"audio_ratios": [0.8], "video_ratios": [0.3]}}, "recipe.yaml")
    assert ok.reconstruction.audio_ratios == [0.8] and ok.contrastive.audio_mode == "tf_block"


def test_build_model_from_sections():
    """build_model turns the three sections into an AVViTForPretraining carrying the masking and loss settings."""
    model_cfg = validate(
        ModelConfig,
        {"arch": "avvit_tiny_patch16", "attn_implementation": "eager", "audio_num_frames": 32, "video_image_size": 32,
         "decoder_num_hidden_layers": 1, "separate_modality_norms": False},
    )
    masking = validate(MaskingConfig, {"reconstruction": {"audio_ratios": [0.8], "video_ratios": [0.3]}})
    loss = validate(LossConfig, {"contrastive_weight": 0.5})
    model = build_model(model_cfg, masking, loss)
    assert isinstance(model, AVViTForPretraining)
    assert model.config._attn_implementation == "eager" and model.config.decoder_num_hidden_layers == 1
    assert model.objective.masking.reconstruction.video_ratios == [0.3] and model.objective.loss.contrastive_weight == 0.5
    assert set(model.avvit.layers[0].norm1.keys()) == {"shared"}
    out = model(*batch(2, frames=32, mels=128, v=1, size=32))
    assert out.audio_mask.sum(1).tolist() == [round(0.8 * 16)] * 2 and out.video_mask.sum(1).tolist() == [1, 1]
    checkpointed = build_model(model_cfg.model_copy(update={"gradient_checkpointing": True}), masking, loss)
    assert checkpointed.avvit.layers[0].gradient_checkpointing and checkpointed.decoder.layers[0].gradient_checkpointing
    with pytest.raises(ConfigError, match="masks 0"):
        build_model(model_cfg, validate(MaskingConfig, {"reconstruction": {"audio_ratios": [0.75], "video_ratios": [0.1]}}), loss)


# ---------------------------------------------------------------- benchmark


def test_bench_flop_formula_and_smoke(monkeypatch):
    """The FLOP count follows 24ND^2 + 4N^2D per layer; bench_model returns one timed row per (compile mode,
    arch, attn, batch, packing) with the ratios against the padded and the eager padded step, and a compiled
    row warms up 3 steps, reports its compile time and graphs, and records a failed compile as an error."""
    from avssl.pretrain import bench

    assert layer_flops(10, 8, 32) == 24 * 10 * 64 + 4 * 100 * 8
    config = avvit_config_from_sections(ModelConfig(arch="avvit_tiny_patch16", audio_num_frames=32, video_image_size=32))
    masking = MaskingConfig.model_validate(
        {"contrastive": {"audio_ratios": [0.5], "video_ratios": [0.5]}, "reconstruction": {"audio_ratios": [0.75], "video_ratios": [0.75]}}
    )
    flops = pretraining_flops(config, masking, LossConfig(), 2, 32, 1, 32)
    d, n_a, n_v = 192, 16, 4
    assert flops["encoder_contrastive"] == 4 * (layer_flops(8, d, 4 * d) + layer_flops(2, d, 4 * d))
    assert flops["encoder_reconstruction"] == 4 * layer_flops(4 + 1, d, 4 * d)
    assert flops["patch_embed"] == 2 * n_a * 256 * d + 2 * n_v * 768 * d
    assert flops["total_fwd_bwd"] == 3 * flops["total_fwd"]
    tiny = {"archs": ("avvit_tiny_patch16",), "attn": ("sdpa",), "steps": 1, "warmup": 0, "audio_frames": 32, "image_size": 32}
    rows = bench_model(batch_size=1, **tiny)
    assert len(rows) == 1 and rows[0]["step_ms"] > 0 and rows[0]["tokens_per_sample"] == n_a + n_v
    # Eager by default: no compile time, and no baseline row (eager padded) in this run.
    assert rows[0]["compile"] is None and rows[0]["compile_s"] is None and rows[0]["graphs"] is None
    assert "vs_baseline" not in rows[0] and "error" not in rows[0]
    # Both packings in one run: the packed row carries the padded step time over its own, which is
    # also its ratio to the baseline (the padded row's own is 1).
    rows = bench_model(batch_size=4, packing=(False, True), **tiny)
    assert [r["packed"] for r in rows] == [False, True] and rows[1]["vs_padded"] > 0 and "vs_padded" not in rows[0]
    assert rows[0]["vs_baseline"] == 1.0 and rows[1]["vs_baseline"] == rows[1]["vs_padded"]
    # A batch sweep in one run: each batch size is its own baseline.
    saved = []
    rows = bench_model(batch_size=(1, 3), packing=(False,), on_row=lambda rs: saved.append(len(rs)), **tiny)
    assert [r["batch_size"] for r in rows] == [1, 3] and [r["vs_baseline"] for r in rows] == [1.0, 1.0]
    assert saved == [1, 2]
    with pytest.raises(ValueError, match="compile modes"):
        bench_model(batch_size=1, compile_modes=("fastest",), **tiny)
    # The compiled path's bookkeeping, with compiling replaced (it takes minutes on a CPU): the compiled
    # row warms up 3 steps though 0 were asked, compiles no graph, and is timed against the eager padded row.
    calls = []
    monkeypatch.setattr(bench, "compile_layers", lambda model, mode: calls.append(mode))
    steps = []
    real_setup = bench.bench_setup

    def counting_setup(*args, **kwargs):
        model, inputs = real_setup(*args, **kwargs)
        model.register_forward_hook(lambda *_: steps.append(1))
        return model, inputs

    monkeypatch.setattr(bench, "bench_setup", counting_setup)
    rows = bench_model(batch_size=2, packing=(False,), compile_modes=(None, "default"), **tiny)
    assert calls == ["default"] and len(steps) == 1 + 3 + 1
    eager, compiled = rows
    assert compiled["compile"] == "default" and compiled["compile_s"] >= 0 and compiled["graphs"] == 0
    assert compiled["vs_baseline"] == pytest.approx(eager["step_ms"] / compiled["step_ms"]) and "vs_padded" not in compiled
    # A compile that fails is a row with its error, and the sweep goes on; an eager failure is raised.
    def fail(*args, **kwargs):
        raise RuntimeError("no\ncompiler")

    monkeypatch.setattr(bench, "compile_layers", fail)
    rows = bench_model(batch_size=2, packing=(False,), compile_modes=("reduce-overhead", None), **tiny)
    assert rows[0]["error"] == "RuntimeError: no compiler" and rows[0]["step_ms"] is None and "vs_baseline" not in rows[0]
    assert rows[1]["step_ms"] > 0 and rows[1]["vs_baseline"] == 1.0
    monkeypatch.setattr(bench, "bench_setup", fail)
    with pytest.raises(RuntimeError, match="no"):
        bench_model(batch_size=1, **tiny)


@pytest.mark.parametrize("cls_token", [False, True])
def test_packed_contrastive_view_equals_the_padded_one_and_runs_fewer_tokens(cls_token):
    """Packing the contrastive view by masking ratio (one encoder pass per sub-batch, no padding slots)
    gives the padded view's embeddings, losses and gradients up to rounding, on batches that split
    into sub-batches evenly and unevenly, and the FLOP count drops by the padding it skips."""
    for b in (4, 7):
        got = {}
        for pack in (False, True):
            torch.manual_seed(0)
            model = pretraining_model(masking={"pack_contrastive": pack}, use_cls_token=cls_token,
                                      loss={"contrastive_weight": 1.0, "projection": "mlp", "projection_dim": 16})
            audio, video = batch(b)
            torch.manual_seed(1)
            out = model(audio=audio, video=video, has_video=torch.arange(b) != 1)
            out.loss.backward()
            got[pack] = (out, {n: p.grad for n, p in model.named_parameters() if p.grad is not None})
        (padded, g_pad), (packed, g_pack) = got[False], got[True]
        for key in ("audio_embeds", "video_embeds"):
            assert torch.allclose(packed[key], padded[key], atol=1e-5), key
        for key in ("loss", "loss_contrastive", "contrastive_accuracy", "loss_reconstruction"):
            assert torch.allclose(packed[key], padded[key], rtol=1e-5, atol=1e-6), key
        assert g_pack.keys() == g_pad.keys()
        # Rounding only, relative to the gradients' norms (the norm biases before the batch-normed heads
        # get near-cancelling gradients, whose own relative rounding is larger).
        flat = {k: torch.cat([g.flatten() for g in grads.values()]) for k, grads in ((True, g_pack), (False, g_pad))}
        assert (flat[True] - flat[False]).norm() <= 1e-4 * flat[False].norm()
        for name, grad in g_pad.items():
            assert (g_pack[name] - grad).norm() <= 1e-3 * grad.norm() + 1e-5, name
    config = small_config()
    flops = {pack: pretraining_flops(config, MaskingConfig(pack_contrastive=pack), LossConfig(), 10, 48, 2, 32)
             for pack in (False, True)}
    assert flops[True]["encoder_contrastive"] < 0.75 * flops[False]["encoder_contrastive"]
    assert flops[True]["encoder_reconstruction"] == flops[False]["encoder_reconstruction"]


def test_reconstruction_targets_are_normalized_per_modality_as_configured():
    """norm_pix_loss (video) and audio_norm_pix_loss (audio) choose, per modality, between the raw
    patches and MAE's per-patch normalized ones as the target of the masked-patch MSE."""
    from avssl.pretrain.losses import masked_patch_loss

    audio, video = batch(2)
    for audio_norm, video_norm in ((False, True), (True, False)):
        model = pretraining_model(loss={"audio_norm_pix_loss": audio_norm, "norm_pix_loss": video_norm})
        torch.manual_seed(0)
        out = model(audio=audio, video=video)
        emb = model.avvit.embeddings
        for name, target, norm in (("audio", emb.patchify_audio(audio), audio_norm), ("video", emb.patchify_video(video), video_norm)):
            pred, mask = out[f"pred_{name}"], out[f"{name}_mask"]
            expect = masked_patch_loss(pred, target, mask, norm)
            other = masked_patch_loss(pred, target, mask, not norm)
            assert torch.allclose(out[f"loss_rec_{name}"], expect) and not torch.allclose(out[f"loss_rec_{name}"], other), name


def test_forward_features_reads_one_input_type():
    """`AVViTModel.forward_features(AVInputs)` is the encoder on the batch the inputs hold, presence included;
    `AVInputs.of` fills presence for an input given without flags and for a missing one."""
    from avssl.pretrain.inputs import AVInputs

    torch.manual_seed(0)
    model = AVViTModel(small_config()).eval()
    audio, video = batch(3)
    has_video = torch.tensor([True, False, True])
    inputs = AVInputs.of(audio, video, has_video=has_video)
    assert inputs.has_audio.tolist() == [True] * 3 and inputs.batch_size == 3
    with torch.no_grad():
        out = model.forward_features(inputs, output_layers=[0])
        ref = model(audio=audio, video=video, has_video=has_video, output_layers=[0])
        assert torch.equal(out.fused_embeds, ref.fused_embeds)
        assert torch.equal(out.intermediate_hidden_states[0], ref.intermediate_hidden_states[0])
        alone = model.forward_features(AVInputs.of(audio=audio))
        assert alone.video_embeds is None and torch.equal(alone.audio_embeds, model(audio=audio).audio_embeds)
    assert not AVInputs.of(video=video).has_audio.any()
    with pytest.raises(ValueError, match="audio, video or both"):
        AVInputs.of()
