"""TaskModel as assembled from its parts: numbers pinned per task and fusion, heads saved with the
older state-dict keys, and an injected fusion module."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from avssl.finetune.config import HeadConfig
from avssl.finetune.fusion import CrossAttentionFusion, JointFusion, LateFusion, build_fusion
from avssl.finetune.heads import TaskModel
from avssl.pretrain.config import LossConfig, MaskingConfig, ModelConfig, build_model

FRAMES, MELS, VFRAMES, SIZE = 98, 64, 2, 32

# One config per task and fusion, and a few that switch on the rest (learned late and layer weights,
# margin warm-up, modality dropout, concat_embedding, segment consistency, a frozen backbone, one modality).
CASES: dict[str, dict] = {f"{task}-{fusion}": dict(task=task, fusion=fusion)
                          for task in ("emotion", "speaker", "spoof") for fusion in ("joint", "late", "dca")}
CASES["speaker-late-learned"] = dict(task="speaker", fusion="late", late_weights="learned", layer_weights="learned",
                                     concat_embedding=True, margin_warmup_steps=2, modality_dropout=0.5, dropout=0.2)
CASES["emotion-dca-mix"] = dict(task="emotion", fusion="dca", layer_weights="learned", pooling="asp",
                                segment_consistency=["video"], label_smoothing=0.1)
CASES["spoof-audio-frozen"] = dict(task="spoof", modalities=["audio"], segment_consistency=["audio"], pooling="asp",
                                   freeze_backbone=True, feature_norm="none")

# float32 rounding differs between CPUs (SIMD width, thread splits): the first step's forward pass
# agrees to about 1e-6, its gradients and what two optimizer steps make of them to about 1e-4
# (measured: one against two threads). A changed computation moves these numbers by far more.
TOLERANCE = {
    "step0": dict(rel=1e-5, abs=1e-5),
    "grads": dict(rel=1e-3, abs=1e-6),
    "trained": dict(rel=1e-3, abs=1e-5),
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_backbone():
    torch.manual_seed(0)
    model = ModelConfig(arch="avvit_tiny_patch16", audio_num_mel_bins=MELS, audio_num_frames=FRAMES,
                        video_image_size=SIZE, video_num_frames=VFRAMES)
    return build_model(model, MaskingConfig(), LossConfig()).avvit


@pytest.fixture(scope="module")
def tiny_backbone():
    return make_backbone()


def head(task: str, **kw) -> HeadConfig:
    if task == "speaker":
        kw.setdefault("num_classes", 5)
        kw.setdefault("embedding_dim", 32)
    return HeadConfig(task=task, **kw)


def inputs() -> tuple[torch.Tensor, ...]:
    """A batch with an AV, an audio-only, a video-only and an AV sample."""
    g = torch.Generator().manual_seed(2)
    audio, video = torch.randn(4, FRAMES, MELS, generator=g), torch.randn(4, VFRAMES, 3, SIZE, SIZE, generator=g)
    return audio, video, torch.tensor([1, 1, 0, 1], dtype=torch.bool), torch.tensor([1, 0, 1, 1], dtype=torch.bool)


LABELS = {"emotion": [0, 1, 5, -1], "speaker": [0, 4, 2, 1], "spoof": [1, 0, 1, 0]}


def numbers(backbone, spec: dict) -> dict[str, list[float]]:
    """"step0": the first training step's loss and loss terms, the fused logits and embedding of the
    first sample, and the gradient norm of each optimizer group (`param_groups`); "trained": the second
    step's loss terms and, after two SGD steps (lr 1e-4 x lr_scale, the groups' weight decay), the
    eval logits and embedding of the first sample and the scores' sums.
    SGD, not Adam: Adam's first steps move every weight by about its LR whatever the gradient's size,
    so a gradient that is 0 up to rounding would move the numbers by a CPU's rounding."""
    cfg = head(**spec)
    torch.manual_seed(1)
    model = TaskModel(copy.deepcopy(backbone), cfg)
    groups = model.param_groups(0.05)
    for group in groups:
        group["lr"] = 1e-4 * group["lr_scale"]
    opt = torch.optim.SGD(groups)
    audio, video, has_audio, has_video = inputs()
    labels = torch.tensor(LABELS[cfg.task])
    got: dict[str, list[float]] = {}
    model.train()
    for step in range(2):
        out = model(audio, video, has_audio, has_video, labels=labels, step=step)
        opt.zero_grad()
        out.loss.backward()
        losses = [out.loss.item()] + [out.loss_parts[m].item() for m in ("av", "a", "v") if m in out.loss_parts]
        if step == 0:
            got["step0"] = losses + out.logits[0].tolist() + out.embeddings[0, :4].tolist()
            got["grads"] = [_grad_norm(g["params"]) for g in groups]
        else:
            got["trained"] = losses
        opt.step()
    model.eval()
    with torch.no_grad():
        out = model(audio, video, has_audio, has_video)
        scores = model.scores(audio, video, has_audio, has_video)
    got["trained"] += out.logits[0].tolist() + out.embeddings[0, :4].tolist()
    got["trained"] += [scores.sum().item(), scores.abs().sum().item()]
    return got


def _grad_norm(params: list[torch.Tensor]) -> float:
    norms = [p.grad.norm() for p in params if p.grad is not None]
    return torch.stack(norms).norm().item() if norms else 0.0


@pytest.mark.parametrize("name", list(CASES))
def test_numbers_of_each_task_and_fusion_are_pinned(tiny_backbone, name):
    """The first step's losses, outputs and gradients per optimizer group, and the outputs after two
    optimizer steps, match the recorded ones."""
    got = numbers(tiny_backbone, CASES[name])
    want = PINNED[name]
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], **TOLERANCE[key]), (name, key)


# ---------------------------------------------------------------- state dict


# The head keys of releases written with the fusion's parameters at the top level: a late-fusion
# speaker model with learned weights (the speaker recipe's) and a DCA model.
OLD_LATE_KEYS = {
    "late_logits",
    *(f"heads.{m}.{p}" for m in ("audio", "video") for p in ("embedding.weight", "embedding.bias", "aam.weight")),
    *(f"pools.{m}.attention.{i}.{p}" for m in ("audio", "video") for i in (0, 2) for p in ("weight", "bias")),
    *(f"norms.{mode}.{s}" for mode in ("av", "a", "v") for s in ("running_mean", "running_var")),
}
OLD_DCA_KEYS = {
    *(f"dca.{part}.{m}.{p}" for part in ("query", "key", "value", "gate") for m in ("audio", "video")
      for p in ("weight", "bias")),
    "heads.shared.classifier.weight", "heads.shared.classifier.bias",
    *(f"norms.{mode}.{s}" for mode in ("av", "a", "v") for s in ("running_mean", "running_var")),
}


def old_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The head entries of a state dict under the keys of the earlier layout."""
    renamed = {}
    for key, value in state.items():
        if key.startswith("backbone."):
            continue
        key = key.replace("fusion.dca.", "dca.") if key.startswith("fusion.dca.") else key
        renamed["late_logits" if key == "fusion.late_logits" else key] = value
    return renamed


@pytest.mark.parametrize("cfg,old", [
    (dict(task="speaker", fusion="late", late_weights="learned", pooling="asp"), OLD_LATE_KEYS),
    (dict(task="emotion", fusion="dca"), OLD_DCA_KEYS),
])
def test_heads_saved_with_the_earlier_keys_load_and_predict_the_same(tiny_backbone, cfg, old):
    """A head state dict with `late_logits` / `dca.*` keys loads strictly (no missing or unexpected
    key) into the model, and then gives the saved model's outputs."""
    torch.manual_seed(3)
    saved = TaskModel(copy.deepcopy(tiny_backbone), head(**cfg)).eval()
    with torch.no_grad():
        for param in saved.parameters():
            param.add_(0.01 * torch.randn_like(param))
    state = old_keys(saved.state_dict())
    assert set(state) == old
    loaded = TaskModel(copy.deepcopy(tiny_backbone), head(**cfg)).eval()
    loaded.load_state_dict({**{k: v for k, v in saved.state_dict().items() if k.startswith("backbone.")}, **state})
    audio, video, has_audio, has_video = inputs()
    with torch.no_grad():
        want, got = saved(audio, video, has_audio, has_video), loaded(audio, video, has_audio, has_video)
    assert torch.equal(got.logits, want.logits) and torch.equal(got.embeddings, want.embeddings)
    reloaded = old_keys(loaded.state_dict())
    assert reloaded.keys() == state.keys() and all(torch.equal(reloaded[k], state[k]) for k in state)


def test_a_release_with_the_earlier_keys_loads_through_the_runner(tiny_backbone, tmp_path):
    """`load_task_model` reads a release whose head.safetensors has `late_logits` (every speaker release
    of the default recipe) and keeps its learned weights."""
    from safetensors.torch import save_file

    from avssl.finetune.runner import load_task_model

    cfg = head("speaker", fusion="late", late_weights="learned")
    model = TaskModel(copy.deepcopy(tiny_backbone), cfg)
    with torch.no_grad():
        model.late_logits.copy_(torch.tensor([0.0, math.log(3.0)]))
    model.backbone.save_pretrained(tmp_path / "backbone", safe_serialization=True)
    save_file({k: v.contiguous() for k, v in old_keys(model.state_dict()).items()}, tmp_path / "head.safetensors")
    (tmp_path / "head.json").write_text(cfg.model_dump_json())
    (tmp_path / "labels.json").write_text(json.dumps([f"spk{i}" for i in range(5)]))
    (tmp_path / "avssl_features.json").write_text("{}")
    loaded, labels, _ = load_task_model(tmp_path)
    assert loaded.late_weights().tolist() == pytest.approx([0.25, 0.75]) and len(labels) == 5


# ---------------------------------------------------------------- fusion injection


def test_the_fusion_is_a_module_the_config_picks_or_the_caller_injects(tiny_backbone):
    """build_fusion follows head.fusion; an injected fusion decides the branches and is the one used."""
    dim = tiny_backbone.config.hidden_size
    kinds = {"joint": JointFusion, "late": LateFusion, "dca": CrossAttentionFusion}
    for name, kind in kinds.items():
        assert type(build_fusion(head("emotion", fusion=name), dim)) is kind
    audio, video, has_audio, has_video = inputs()
    cfg = head("emotion", fusion="dca")
    torch.manual_seed(4)
    default = TaskModel(copy.deepcopy(tiny_backbone), cfg).eval()
    fusion = CrossAttentionFusion(dim, temperature=0.5)
    injected = TaskModel(copy.deepcopy(tiny_backbone), cfg, fusion=fusion).eval()
    assert injected.fusion is fusion and set(injected.pools) == {"audio", "video"}
    injected.load_state_dict(default.state_dict())
    with torch.no_grad():
        moved = injected(audio, video, has_audio, has_video).logits
        fusion.dca.temperature = default.fusion.dca.temperature
        same = injected(audio, video, has_audio, has_video).logits
        want = default(audio, video, has_audio, has_video).logits
    assert torch.equal(same, want) and not torch.allclose(moved, want, atol=1e-4)
    # A late fusion injected into a joint config: per-modality poolings and heads, "av" combined.
    late = TaskModel(copy.deepcopy(tiny_backbone), head("emotion"), fusion=LateFusion())
    assert set(late.pools) == set(late.heads) == {"audio", "video"}
    out = late.eval()(audio, video, has_audio, has_video)
    assert set(out.per_modality) == {"av", "a", "v"}


# Recorded on CPU with one thread (`numbers`). A change that moves them changes what the model
# computes: regenerate them deliberately with `python tests/test_task_model.py` and say why they moved.
PINNED: dict[str, dict[str, list[float]]] = {
    "emotion-joint": {
        "step0": [
            6.844389915466309, 2.0218617916107178, 2.9010355472564697, 1.921492338180542, 0.5559015870094299,
            0.7925191521644592, 1.7422244548797607, 0.15966220200061798, 0.011573612689971924, -0.19479113817214966,
            -1.1979559659957886, 0.33856797218322754, 1.4726604223251343, -0.5836023688316345
        ],
        "grads": [
            1.7005667686462402, 22.505460739135742, 1.743691325187683, 20.844099044799805, 1.4070487022399902,
            19.06781005859375, 1.1536587476730347, 18.63113784790039, 0.9907267689704895, 17.30624008178711,
            1.1395241022109985, 22.219072341918945, 1.4370900392532349
        ],
        "trained": [
            6.655890941619873, 2.040201425552368, 2.753268241882324, 1.8624216318130493, -0.13575543463230133,
            0.23101405799388885, 0.35483109951019287, -0.2340797334909439, -0.02730318158864975, -0.14347681403160095,
            -0.6610559821128845, 0.624009370803833, 0.3867431581020355, 0.24357332289218903, 3.999999523162842,
            3.999999523162842
        ],
    },
    "emotion-late": {
        "step0": [
            7.315595626831055, 2.546137571334839, 2.739283800125122, 2.0301742553710938, -1.8203117847442627,
            -1.8092529773712158, -1.9686682224273682, -1.943826675415039, -1.996133804321289, -1.7229946851730347,
            -1.2486735582351685, -0.38335269689559937, 1.3969242572784424, -0.42389360070228577
        ],
        "grads": [
            0.9864827394485474, 23.66179084777832, 1.462290644645691, 20.713415145874023, 1.205604910850525,
            19.10468101501465, 0.9832087159156799, 18.667804718017578, 0.8532554507255554, 16.98356056213379,
            0.0018971760291606188, 23.612287521362305, 1.3505713939666748
        ],
        "trained": [
            7.408229827880859, 2.5406653881073, 2.8101325035095215, 2.057431936264038, -2.1058835983276367,
            -1.671649694442749, -1.6559069156646729, -2.0123531818389893, -1.6933870315551758, -1.8364639282226562,
            -0.7162675857543945, 0.21702323853969574, 0.4153544306755066, 0.14834579825401306, 4.0, 4.0
        ],
    },
    "emotion-dca": {
        "step0": [
            6.028871059417725, 1.9561697244644165, 2.1325509548187256, 1.940150260925293, -0.4722767174243927,
            -0.3152998983860016, -0.27585476636886597, 0.34741219878196716, -0.27154800295829773, 0.6643677949905396,
            -0.5248070955276489, 0.024934252724051476, 1.3298158645629883, 0.15443387627601624
        ],
        "grads": [
            2.81803822517395, 26.847015380859375, 3.356318950653076, 27.52027702331543, 2.7417640686035156,
            23.893898010253906, 2.383357048034668, 22.650192260742188, 2.069408416748047, 20.760499954223633,
            2.0905990600585938, 33.86579513549805, 2.7151012420654297
        ],
        "trained": [
            5.8768415451049805, 1.8356393575668335, 2.232175350189209, 1.8090264797210693, -0.2613605260848999,
            -0.2350679188966751, -0.17773936688899994, -0.07611994445323944, -0.4350811243057251, 0.3092567026615143,
            0.11234859377145767, 0.47745999693870544, 0.39219507575035095, 0.268861323595047, 4.0, 4.0
        ],
    },
    "speaker-joint": {
        "step0": [
            31.72212791442871, 13.910795211791992, 11.862730979919434, 5.94860315322876, -5.750820636749268,
            -4.377427101135254, 6.934232234954834, -2.2636711597442627, -3.7922818660736084, 0.189647376537323,
            -0.09369983524084091, -0.1356877088546753, 0.18190990388393402
        ],
        "grads": [
            12.44698715209961, 261.38641357421875, 14.723319053649902, 188.3759307861328, 11.849123001098633,
            166.8012237548828, 9.673219680786133, 156.29393005371094, 7.971098899841309, 137.58799743652344,
            13.26477336883545, 276.52667236328125, 10.593812942504883
        ],
        "trained": [
            20.30433464050293, 9.639887809753418, 9.702195167541504, 0.9622508883476257, -6.0483479499816895,
            -5.109507083892822, -2.288621664047241, 0.3880805969238281, 3.3316972255706787, 0.15415145456790924,
            -0.26492682099342346, -0.19114145636558533, 0.0307462215423584, 3.977703094482422, 18.51347541809082
        ],
    },
    "speaker-late": {
        "step0": [
            41.617862701416016, 13.11642837524414, 14.734939575195312, 13.766494750976562, -2.283046245574951,
            -2.7061543464660645, 1.163919448852539, -1.594489574432373, 3.795058012008667, 0.26381173729896545,
            0.16904696822166443, 0.08833950757980347, 0.04136700928211212
        ],
        "grads": [
            15.530860900878906, 528.5872802734375, 23.052032470703125, 337.270263671875, 18.949813842773438,
            298.40789794921875, 17.031400680541992, 280.53900146484375, 12.89819622039795, 247.58665466308594,
            3.145045518875122, 365.6741027832031, 7.018742561340332
        ],
        "trained": [
            17.386632919311523, 5.013067722320557, 6.934797763824463, 5.438767910003662, 4.351128578186035,
            1.4659037590026855, -1.8434302806854248, -0.3027101159095764, -3.3962228298187256, 0.21301622688770294,
            -0.16988055408000946, 0.13785789906978607, -0.11924121528863907, -0.02420860528945923, 18.365936279296875
        ],
    },
    "speaker-dca": {
        "step0": [
            27.343135833740234, 8.64760971069336, 5.0202789306640625, 13.675247192382812, 7.307438850402832,
            3.0986673831939697, 5.5714287757873535, 2.2927188873291016, 3.5262372493743896, 0.22204360365867615,
            -0.11764944344758987, 0.3749994933605194, 0.06914526969194412
        ],
        "grads": [
            27.895103454589844, 281.73370361328125, 39.42826843261719, 278.1426696777344, 31.435543060302734,
            236.72006225585938, 26.08999252319336, 216.938720703125, 24.008085250854492, 202.98977661132812,
            23.109922409057617, 517.429443359375, 58.11567306518555
        ],
        "trained": [
            28.346336364746094, 5.360219955444336, 4.338607311248779, 18.64750862121582, 12.097495079040527,
            5.375309467315674, 4.758782863616943, 3.9064126014709473, 0.8245768547058105, 0.09541147947311401,
            -0.14388445019721985, 0.18653398752212524, -0.015518613159656525, -1.1031301021575928, 18.75180435180664
        ],
    },
    "spoof-joint": {
        "step0": [
            2.6693575382232666, 0.7697270512580872, 0.8843335509300232, 1.0152969360351562, 0.47986936569213867,
            0.8923420310020447, -1.1979559659957886, 0.33856797218322754, 1.4726604223251343, -0.5836023688316345
        ],
        "grads": [
            1.2769484519958496, 17.24447250366211, 1.239250659942627, 15.368985176086426, 1.010618805885315,
            13.522714614868164, 0.8602498769760132, 13.12574577331543, 0.7482123374938965, 12.131186485290527,
            0.8379971981048584, 17.551788330078125, 0.0804368406534195
        ],
        "trained": [
            2.586277484893799, 0.6968526840209961, 0.9474181532859802, 0.9420066475868225, -0.14449524879455566,
            0.3162073493003845, -0.6609402298927307, 0.6253661513328552, 0.3866197466850281, 0.24277549982070923,
            2.2933363914489746, 2.2933363914489746
        ],
    },
    "spoof-late": {
        "step0": [
            2.6152780055999756, 0.9721135497093201, 1.0125912427902222, 0.6305733323097229, -0.707195520401001,
            -0.6961064338684082, -1.2486735582351685, -0.38335269689559937, 1.3969242572784424, -0.42389360070228577
        ],
        "grads": [
            0.835174024105072, 21.504871368408203, 1.2973695993423462, 18.570131301879883, 1.065320372581482,
            16.527402877807617, 0.8609340786933899, 16.069780349731445, 0.7622272372245789, 14.667153358459473,
            0.0011693720007315278, 15.992225646972656, 0.7244688868522644
        ],
        "trained": [
            2.5013201236724854, 0.9500594735145569, 0.9073218703269958, 0.6439387798309326, -1.0685131549835205,
            -0.4226020872592926, -0.7151504755020142, 0.21722830832004547, 0.41488173604011536, 0.1478094607591629,
            2.4925692081451416, 2.4925692081451416
        ],
    },
    "spoof-dca": {
        "step0": [
            2.42203426361084, 0.6492393612861633, 1.0274744033813477, 0.7453206181526184, -0.10432279109954834,
            -0.4263263940811157, -0.5248070955276489, 0.024934252724051476, 1.3298158645629883, 0.15443387627601624
        ],
        "grads": [
            2.18615984916687, 20.685136795043945, 2.811626672744751, 23.881763458251953, 2.2807796001434326,
            20.79452133178711, 1.9996964931488037, 19.15267562866211, 1.7601470947265625, 17.62952423095703,
            1.6537184715270996, 25.56650161743164, 2.144659996032715
        ],
        "trained": [
            2.282423257827759, 0.6143417954444885, 0.9387966990470886, 0.7292848229408264, -0.2137567102909088,
            -0.2673262655735016, 0.1129130944609642, 0.4776137173175812, 0.3905166685581207, 0.2687644362449646,
            1.8755897283554077, 1.8755897283554077
        ],
    },
    "speaker-late-learned": {
        "step0": [
            17.184202194213867, 5.35170841217041, 3.832827568054199, 7.999666690826416, -3.4569287300109863,
            -3.705965280532837, 6.870273590087891, -4.378495216369629, 7.624283790588379, 0.038670435547828674,
            0.3863847851753235, 0.08704498410224915, 0.22348874807357788
        ],
        "grads": [
            16.581937789916992, 511.56427001953125, 25.924312591552734, 387.0912170410156, 17.26958465576172,
            291.0362243652344, 12.330010414123535, 217.65460205078125, 8.272756576538086, 155.67881774902344,
            0.19773228466510773, 372.4136047363281, 12.416836738586426, 0.073056161403656, 4.005290985107422
        ],
        "trained": [
            18.696447372436523, 3.8922605514526367, 6.0371222496032715, 8.767065048217773, -1.3803577423095703,
            -3.1427087783813477, 0.8931823372840881, 1.337928295135498, -1.747753620147705, -0.113102488219738,
            0.2941852807998657, 0.0868849903345108, 0.17751789093017578, 1.2239422798156738, 18.219579696655273
        ],
    },
    "emotion-dca-mix": {
        "step0": [
            6.0538482666015625, 2.513347864151001, 1.796645998954773, 1.7438547611236572, 0.10594318807125092,
            0.5171271562576294, -0.06410343199968338, 0.4215005338191986, 0.32964012026786804, 0.009527908638119698,
            -1.2135570049285889, -0.06341584771871567, 0.9208098649978638, -0.5594015121459961
        ],
        "grads": [
            1.51036536693573, 42.28904724121094, 2.1028270721435547, 29.170108795166016, 1.52686607837677,
            23.744197845458984, 1.2343029975891113, 23.113012313842773, 0.9929594397544861, 21.392749786376953,
            0.002929551526904106, 34.761295318603516, 2.0038774013519287, 0.23448418080806732
        ],
        "trained": [
            5.808097839355469, 2.316274881362915, 1.793421745300293, 1.6984012126922607, 0.053609780967235565,
            0.3755805194377899, -0.05067014321684837, -0.12439446896314621, 0.14617101848125458, 0.11335483938455582,
            0.07499527931213379, 0.33121946454048157, 0.376127690076828, 0.325944721698761, 4.000000476837158,
            4.000000476837158
        ],
    },
    "spoof-audio-frozen": {
        "step0": [
            0.6310896873474121, 0.6310896873474121, 0.4341416358947754, 0.15217603743076324, -0.5668401718139648,
            1.0823099613189697, 0.2815629839897156, 0.36464157700538635
        ],
        "grads": [
            5.123306751251221, 0.24887268245220184
        ],
        "trained": [
            0.7215248942375183, 0.7215248942375183, 0.3533634841442108, 0.31428176164627075, -0.5668401122093201,
            1.082308053970337, 0.2815617322921753, 0.3646453619003296, 2.053471088409424, 2.053471088409424
        ],
    },
}


if __name__ == "__main__":  # print the numbers to pin
    torch.set_num_threads(1)
    backbone = make_backbone()
    print("PINNED: dict[str, dict[str, list[float]]] = {")
    for case, spec in CASES.items():
        print(f'    "{case}": {json.dumps(numbers(backbone, spec))},')
    print("}")
