"""Cluster layer without a cluster: recipes, DeepSpeed JSON, schedule, MLflow resilience, manifests."""

from __future__ import annotations

import math
import socket
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

from avssl.cluster.config import DeepSpeedConfig, MlflowConfig, OptimConfig, PretrainRecipe, derive
from avssl.cluster.engine import deepspeed_config, param_groups, warmup_cosine
from avssl.cluster.tracking import MlflowLogger, open_run, resolve_tracking_uri
from avssl.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((REPO / "configs/pretrain").glob("*.yaml")), ids=lambda p: p.name)
def test_pretrain_recipes_validate(path):
    """Every shipped pretraining recipe validates, and its model geometry matches its data pipeline."""
    recipe = load_config(PretrainRecipe, path)
    assert recipe.model.audio_num_frames == recipe.features.num_audio_frames(recipe.data.clip_seconds)


@pytest.mark.parametrize("path", sorted((REPO / "configs/finetune").glob("*.yaml")), ids=lambda p: p.name)
def test_finetune_recipes_validate(path):
    """Every shipped finetuning recipe validates against FinetuneRecipe and is named <task>[_<dataset>].yaml."""
    from avssl.finetune.recipe import FinetuneRecipe

    recipe = load_config(FinetuneRecipe, path)
    assert path.stem.split("_")[0] == recipe.head.task
    assert recipe.model.audio_num_frames == recipe.features.num_audio_frames(recipe.data.clip_seconds)


def test_mismatched_geometry_names_the_fix():
    """A model whose mel bins differ from the features fails at load time saying which key to set."""
    from avssl.config import ConfigError

    with pytest.raises(ConfigError, match=r"model.audio_num_mel_bins=128 does not match features.num_mel_bins=64"):
        load_config(PretrainRecipe, REPO / "configs/pretrain/tiny.yaml", ["model.audio_num_mel_bins=128"])


def test_model_input_sizes_follow_the_data_pipeline():
    """The model's input sizes have one source: a recipe that does not state them takes them from
    features and data.clip_seconds (pretraining and finetuning alike); an override of the features
    moves the model with it."""
    from avssl.finetune.recipe import FinetuneRecipe

    for cls, path in ((PretrainRecipe, "configs/pretrain/tiny.yaml"), (FinetuneRecipe, "configs/finetune/speaker.yaml")):
        stated = set(yaml.safe_load((REPO / path).read_text())["model"])
        assert not {"audio_num_mel_bins", "audio_num_frames", "video_image_size", "video_num_frames"} & stated
        recipe = load_config(cls, REPO / path, ["features.num_mel_bins=80", "features.image_size=48", "features.num_frames=3",
                                                "data.clip_seconds=1.5"])
        m = recipe.model
        assert (m.audio_num_mel_bins, m.video_image_size, m.video_num_frames) == (80, 48, 3)
        assert m.audio_num_frames == recipe.features.num_audio_frames(1.5) == 148


def test_derived_values():
    """Effective batch = micro x accumulation x world; absolute lr = base lr x effective / 256."""
    recipe = load_config(PretrainRecipe, REPO / "configs/pretrain/demo.yaml", ["deepspeed.grad_accum=2"])
    d = derive(recipe, world_size=4)
    assert d["effective_batch"] == 16 * 2 * 4
    assert d["absolute_lr"] == pytest.approx(2e-3 * 128 / 256)


def test_deepspeed_json_follows_config():
    """The generated JSON carries ZeRO stage, batch sizes, clipping, and bf16 on GPU but fp32 on CPU."""
    ds = DeepSpeedConfig(zero_stage=2, grad_accum=3)
    cpu = deepspeed_config(ds, OptimConfig(grad_clip=0.5), micro_batch=8, world_size=2, device=torch.device("cpu"))
    gpu = deepspeed_config(ds, OptimConfig(), micro_batch=8, world_size=2, device=torch.device("cuda"))
    assert cpu["zero_optimization"]["stage"] == 2 and cpu["train_batch_size"] == 48 and cpu["gradient_clipping"] == 0.5
    assert not cpu["bf16"]["enabled"] and gpu["bf16"]["enabled"]
    forced = deepspeed_config(DeepSpeedConfig(precision="fp32"), OptimConfig(), 8, 1, torch.device("cuda"))
    assert not forced["bf16"]["enabled"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU backend's op")
def test_deepspeed_on_a_cpu_starts_without_compiling_its_shm_allreduce():
    """DeepSpeed's CPU backend builds its shared-memory all-reduce (a C++ build, about 20 s on 2
    cores, again in every virtual environment) when it starts, for inference only. Before an engine
    on the CPU is built the op is marked off: DeepSpeed's start builds nothing and training's
    gradients go through gloo."""
    from deepspeed.comm.torch import build_shm_op

    from avssl.cluster.engine import skip_shm_allreduce_build

    skip_shm_allreduce_build()
    assert build_shm_op() is None


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="signal handlers need the main thread")
def test_a_second_ctrl_c_stops_at_once_and_a_repeated_sigterm_changes_nothing(tmp_path):
    """The driver's signal handling: the first SIGINT or SIGTERM writes the STOP file (the workers
    checkpoint at their next log step) and is kept for the exit status; a second SIGINT raises
    KeyboardInterrupt (stop at once, without the checkpoint); a repeated SIGTERM (a batch system
    that signals again) changes nothing. The previous handlers are back afterwards."""
    import os
    import signal

    from avssl.cluster.launch import StopOnSignal

    before = signal.getsignal(signal.SIGINT)
    stop = tmp_path / "STOP"
    with StopOnSignal(stop) as handler:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # the handler runs in this thread between two bytecodes
        assert stop.is_file() and handler.received == signal.SIGINT
        written = stop.read_text()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert handler.received == signal.SIGINT and stop.read_text() == written
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    assert signal.getsignal(signal.SIGINT) is before


def test_warmup_cosine_schedule():
    """Linear warmup to 1, cosine down to the floor at the last step."""
    f = warmup_cosine(warmup_steps=10, total_steps=110, min_ratio=0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)


def _reference_warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """A copy of the schedule's formula: a change to warmup_cosine (a library scheduler a step off) fails below."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@pytest.mark.parametrize("warmup, total, min_ratio", [
    (0, 50, 0.0), (0, 1, 0.3), (1, 7, 0.0), (10, 110, 0.1), (20, 100, 0.0), (5, 5, 0.2), (30, 20, 0.05), (100, 200, 1.0),
])
def test_warmup_cosine_multiplier_is_unchanged_at_every_step(warmup, total, min_ratio):
    """The lr multiplier equals the reference at every step up to twice the run length (warmup 0, warmup
    past the end and a flat floor included), and LambdaLR hands exactly those values to the optimizer."""
    f = warmup_cosine(warmup, total, min_ratio)
    steps = range(2 * max(total, warmup) + 3)
    assert [f(k) for k in steps] == [_reference_warmup_cosine(k, warmup, total, min_ratio) for k in steps]
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, f)
    lrs = []
    for _ in steps:
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == [_reference_warmup_cosine(k, warmup, total, min_ratio) for k in steps]


def test_param_groups_exclude_norms_and_biases_from_decay():
    """Weight decay applies to matrices only; every trainable parameter is in exactly one group."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    decay, no_decay = param_groups(model, 0.05)
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 4])] and len(no_decay["params"]) == 3
    assert no_decay["weight_decay"] == 0.0


def test_default_tracking_uri_is_sqlite_beside_runs(tmp_path, monkeypatch):
    """Without config or MLFLOW_TRACKING_URI the store is SQLite in the storage path."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(MlflowConfig(), tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://example:5000")
    assert resolve_tracking_uri(MlflowConfig(), tmp_path) == "http://example:5000"
    assert resolve_tracking_uri(MlflowConfig(tracking_uri="file:///x"), tmp_path) == "file:///x"


def test_sqlite_logging_and_run_reuse(tmp_path):
    """Metrics reach the SQLite store; opening the same run name again continues the same run."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = MlflowConfig(experiment="unit")
    run_id = open_run(cfg, uri, "r1", tmp_path)
    logger = MlflowLogger(uri, run_id, cfg)
    for step in (1, 2, 3):
        logger.log_metrics({"loss": 1.0 / step}, step=step)
    logger.log_params({"a.b": 1})
    logger.finish(status=None)
    assert open_run(cfg, uri, "r1", tmp_path) == run_id
    assert open_run(cfg, uri, "r2", tmp_path) != run_id
    hist = MlflowClient(uri).get_metric_history(run_id, "loss")
    assert sorted(m.step for m in hist) == [1, 2, 3] and MlflowClient(uri).get_run(run_id).data.params["a.b"] == "1"
    # Resuming under new code: params are write-once, so a changed value becomes a tag, at once
    # (no retries) and without dropping the new keys logged beside it.
    logger = MlflowLogger(uri, run_id, cfg)
    logger.log_params({"a.b": 2, "c": "new"})
    logger.finish(status=None)
    run = MlflowClient(uri).get_run(run_id)
    assert logger.dropped == 0 and run.data.params["a.b"] == "1" and run.data.params["c"] == "new"
    assert run.data.tags["resumed.a.b"] == "2"
    # The experiment opens in MLflow's model-training view, not the GenAI one.
    exp = MlflowClient(uri).get_experiment_by_name("unit")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dead_tracking_server_never_blocks_or_raises():
    """With the server down, logging returns at once, drops after retries, and finish is bounded."""
    cfg = MlflowConfig(retries=1, timeout_s=1)
    logger = MlflowLogger(f"http://127.0.0.1:{_closed_port()}", "0" * 32, cfg)
    t0 = time.monotonic()
    for step in range(50):
        logger.log_metrics({"loss": 1.0}, step=step)
    # A logger that waited on the network would spend a connection attempt and MLflow's retry
    # back-off (seconds) on every one of the 50 calls; queueing them takes microseconds. The bound
    # sits between the two, far from both, so a loaded machine does not fail it.
    assert time.monotonic() - t0 < 5, "log_metrics waited on the network"
    t0 = time.monotonic()
    logger.finish(status="FINISHED", timeout_s=3)  # 50 records of 2 attempts each would take half a minute
    assert time.monotonic() - t0 < 3 + 2 and logger.dropped >= 1


def test_cluster_manifests_reference_real_entry_points():
    """The cluster-launcher YAML and the KubeRay RayJob parse and point at existing commands and recipes."""
    launcher = yaml.safe_load((REPO / "cluster/ray-cluster.yaml").read_text())
    rayjob = yaml.safe_load((REPO / "cluster/kuberay-rayjob.yaml").read_text())
    assert launcher["cluster_name"] and "head_node_type" in launcher and launcher["available_node_types"]
    setup = " ".join(launcher.get("setup_commands", []))
    assert "pip install" in setup
    assert rayjob["kind"] == "RayJob" and rayjob["apiVersion"].startswith("ray.io/")
    entry = rayjob["spec"]["entrypoint"]
    assert "avssl.cli pretrain" in entry or "avssl pretrain" in entry
    config = entry.split("--config")[1].split()[0]
    load_config(PretrainRecipe, REPO / config)
    workers = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    gpu = workers["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    assert int(gpu) >= 1


def test_resuming_under_a_different_model_is_refused_by_name(tmp_path):
    """A run's checkpoints fix the model, head and features: resuming it under other values names
    the run, the changed keys and the fix; steps, learning rate and data may change."""
    from avssl import AvsslError
    from avssl.cluster.export import RUN_CONFIG
    from avssl.cluster.launch import check_resumable
    from avssl.config import save_resolved
    from avssl.finetune.recipe import FinetuneRecipe

    recipe = load_config(FinetuneRecipe, REPO / "configs/finetune/emotion.yaml")
    run_dir = tmp_path / "prove-emotion"
    save_resolved(recipe, run_dir / "avssl" / RUN_CONFIG)
    check_resumable(load_config(FinetuneRecipe, REPO / "configs/finetune/emotion.yaml", ["head.fusion=joint"]), run_dir)
    (run_dir / "checkpoint_000100").mkdir()  # from here on there is something to resume
    check_resumable(load_config(FinetuneRecipe, REPO / "configs/finetune/emotion.yaml",
                                ["trainer.total_steps=400", "optim.base_lr=0.01"]), run_dir)
    with pytest.raises(AvsslError, match=r"prove-emotion holds checkpoints of a different model \(head.fusion: 'late' -> 'joint'\).*trainer.name"):
        check_resumable(load_config(FinetuneRecipe, REPO / "configs/finetune/emotion.yaml", ["head.fusion=joint"]), run_dir)
    # A recipe saved before a head key existed (here late_weights, concat_embedding) ran with its
    # default: it resumes under the default and is refused under another value.
    saved = run_dir / "avssl" / RUN_CONFIG
    tree = yaml.safe_load(saved.read_text())
    del tree["head"]["late_weights"], tree["head"]["concat_embedding"]
    saved.write_text(yaml.safe_dump(tree))
    check_resumable(load_config(FinetuneRecipe, REPO / "configs/finetune/emotion.yaml"), run_dir)
    with pytest.raises(AvsslError, match=r"head.late_weights: 'equal' -> 'learned'"):
        check_resumable(load_config(FinetuneRecipe, REPO / "configs/finetune/emotion.yaml", ["head.late_weights=learned"]), run_dir)


def test_resuming_pretraining_with_other_projection_heads_is_refused(tmp_path):
    """Loss weights may change on resume, the loss keys that add parameters (projection heads) may not."""
    from avssl import AvsslError
    from avssl.cluster.export import RUN_CONFIG
    from avssl.cluster.launch import check_resumable
    from avssl.cluster.config import PretrainRecipe
    from avssl.config import save_resolved

    demo = REPO / "configs/pretrain/demo.yaml"
    bare = ["loss.projection=none", "loss.segment_weight=0"]  # a run without any projection head
    run_dir = tmp_path / "demo"
    save_resolved(load_config(PretrainRecipe, demo, bare), run_dir / "avssl" / RUN_CONFIG)
    (run_dir / "checkpoint_000100").mkdir()
    check_resumable(load_config(PretrainRecipe, demo, [*bare, "loss.contrastive_weight=0.5"]), run_dir)
    with pytest.raises(AvsslError, match=r"loss.projection: 'none' -> 'mlp'"):
        check_resumable(load_config(PretrainRecipe, demo, [*bare, "loss.projection=mlp"]), run_dir)
    # The segment contrast's heads exist or not by whether its weight is above 0: turning it on is refused.
    with pytest.raises(AvsslError, match=r"loss.segment_contrast: False -> True"):
        check_resumable(load_config(PretrainRecipe, demo, [*bare, "loss.segment_weight=0.5"]), run_dir)
    # A run saved before loss.segment_weight existed resumes (the key's absence means 0).
    saved = yaml.safe_load((run_dir / "avssl" / RUN_CONFIG).read_text())
    del saved["loss"]["segment_weight"]
    (run_dir / "avssl" / RUN_CONFIG).write_text(yaml.safe_dump(saved))
    check_resumable(load_config(PretrainRecipe, demo, bare), run_dir)
    # The demo recipe (both contrasts with heads) resumes itself and changes its weights freely.
    demo_dir = tmp_path / "demo_heads"
    save_resolved(load_config(PretrainRecipe, demo), demo_dir / "avssl" / RUN_CONFIG)
    (demo_dir / "checkpoint_000100").mkdir()
    check_resumable(load_config(PretrainRecipe, demo, ["loss.segment_weight=0.5"]), demo_dir)
    with pytest.raises(AvsslError, match=r"loss.segment_contrast: True -> False"):
        check_resumable(load_config(PretrainRecipe, demo, ["loss.segment_weight=0"]), demo_dir)
    # A video clip of one frame has no halves: refused when the recipe loads, naming the keys.
    from avssl.config import ConfigError

    with pytest.raises(ConfigError, match=r"loss.segment_weight=0.5 .* model.video_num_frames=1"):
        load_config(PretrainRecipe, demo, ["loss.segment_weight=0.5", "model.video_num_frames=1", "features.num_frames=1"])


def test_submission_retries_while_the_head_has_no_job_agent_and_then_names_the_address():
    """Ray's head answers "No available agent" when its job agent is not up yet (fresh or busy
    head); the job was not created, so `submit` asks again. Any other error goes through at once."""
    from avssl import AvsslError
    from avssl.cluster.submit import retry_while_no_agent

    now = [0.0]
    naps: list[float] = []

    def sleep(s: float) -> None:
        naps.append(s)
        now[0] += s

    def flaky(failures: int, message: str):
        left = [failures]

        def call() -> str:
            if left[0]:
                left[0] -= 1
                raise RuntimeError(f"Request failed with status code 500: {message}")
            return "raysubmit_1"

        return call

    no_agent = "No available agent to submit job, please try again later."
    assert retry_while_no_agent(flaky(3, no_agent), "http://head:8265", sleep=sleep, clock=lambda: now[0]) == "raysubmit_1"
    assert naps == [2.0, 2.0, 2.0]

    with pytest.raises(AvsslError, match=r"http://head:8265 had no job agent ready for 10 s"):
        retry_while_no_agent(flaky(100, no_agent), "http://head:8265", wait_s=10, sleep=sleep, clock=lambda: now[0])

    naps.clear()
    with pytest.raises(RuntimeError, match="entrypoint"):
        retry_while_no_agent(flaky(1, "bad entrypoint"), "http://head:8265", sleep=sleep, clock=lambda: now[0])
    assert naps == []


@pytest.mark.parametrize("fusion", ["late", "joint"])
def test_finetune_workload_logs_the_learned_weights(fusion):
    """A finetuning run logs one value per key: with learned late weights the video weight, with a
    learned layer mix each branch's mean layer (0 = embedding output, L = last layer)."""
    from avssl.finetune.recipe import FinetuneRecipe
    from avssl.finetune.runner import FinetuneWorkload

    overrides = [f"head.fusion={fusion}", "head.layer_weights=learned", "trainer.num_workers=1"]
    if fusion == "joint":
        overrides.append("head.late_weights=equal")
    recipe = load_config(FinetuneRecipe, REPO / "configs/finetune/spoof.yaml", overrides)
    workload = FinetuneWorkload(recipe, ["bonafide", "spoof"], None)
    branches = ("audio", "video") if fusion == "late" else ("shared",)
    late = ("late_weight_video",) if fusion == "late" else ()
    assert workload.keys == ("loss", "accuracy", *late, *(f"layer_centre_{b}" for b in branches))
    torch.manual_seed(0)
    model, _ = workload.build(1)
    m = recipe.model
    audio, video = torch.randn(2, m.audio_num_frames, m.audio_num_mel_bins), torch.randn(2, m.video_num_frames, 3, m.video_image_size, m.video_image_size)
    labels = torch.tensor([0, 1])
    workload._targets = model.targets(labels)
    values = workload.values(model(audio, video, labels=labels))
    assert len(values) == len(workload.keys)
    depth = model.backbone.config.num_hidden_layers
    for centre in values[len(values) - len(branches):]:
        assert centre.item() == pytest.approx(depth / 2)  # zero logits: the plain mean over 0..L


def test_a_finished_run_is_returned_as_it_is_and_any_change_to_its_recipe_trains_on(tmp_path):
    """Re-running the command of a run that reached trainer.total_steps under the same recipe returns
    it from disk (release, newest checkpoint, its MLflow run and metrics): no Ray, no second export or
    registry version. More steps, another setting, a missing release or a run stopped early: None."""
    import json

    from avssl.cluster.checkpoint import DS_TAG, MODEL_STATES, STATE_FILE
    from avssl.cluster.export import RUN_CONFIG
    from avssl.cluster.launch import finished_run
    from avssl.cluster.tracking import MlflowLogger
    from avssl.config import save_resolved

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    recipe = load_config(PretrainRecipe, REPO / "configs/pretrain/tiny.yaml", [
        f"trainer.storage_path={tmp_path}", "trainer.name=done", f"mlflow.tracking_uri={uri}"])
    run_dir = tmp_path / "done"
    for step in (16, 24):
        checkpoint = run_dir / f"checkpoint_{step:09d}"
        (checkpoint / DS_TAG).mkdir(parents=True)
        (checkpoint / DS_TAG / MODEL_STATES).write_bytes(b"")
        (checkpoint / STATE_FILE).write_text(json.dumps({"step": step}))
    (run_dir / "avssl" / "release").mkdir(parents=True)
    save_resolved(recipe, run_dir / "avssl" / RUN_CONFIG)
    run_id = open_run(recipe.mlflow, uri, "done", tmp_path)
    logger = MlflowLogger(uri, run_id, recipe.mlflow)
    logger.log_metrics({"loss": 2.5}, step=24)
    logger.finish(status="FINISHED")

    done = finished_run(recipe, run_dir, str(tmp_path), exports=True)
    assert done is not None and done.status == "FINISHED" and done.mlflow_run_id == run_id
    assert done.checkpoint == run_dir / "checkpoint_000000024" and done.release == run_dir / "avssl" / "release"
    assert done.metrics == {"loss": 2.5, "step": 24}

    for change in ("trainer.total_steps=48", "optim.base_lr=0.01"):
        changed = load_config(PretrainRecipe, REPO / "configs/pretrain/tiny.yaml", [
            f"trainer.storage_path={tmp_path}", "trainer.name=done", f"mlflow.tracking_uri={uri}", change])
        assert finished_run(changed, run_dir, str(tmp_path), exports=True) is None, change
    (run_dir / "avssl" / "PREEMPTED").write_text("24")
    assert finished_run(recipe, run_dir, str(tmp_path), exports=True) is None
    (run_dir / "avssl" / "PREEMPTED").unlink()
    (run_dir / "avssl" / "release").rmdir()
    assert finished_run(recipe, run_dir, str(tmp_path), exports=True) is None
    assert finished_run(recipe, run_dir, str(tmp_path), exports=False).release is None  # a workload without a release
