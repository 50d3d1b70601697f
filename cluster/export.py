"""Released checkpoints: DeepSpeed (ZeRO) shards -> a Hugging Face-format directory.

A release holds the backbone (`AVViTModel`) as safetensors with its config, the feature
settings needed to reproduce its inputs (`avssl_features.json`: filterbank parameters,
normalization statistics, clip length, image size), a model card (`README.md`) with the
training config and final metrics, and `MLmodel`: MLflow's description of it, with the input
signature (audio [-1, T, F], video [-1, V, 3, H, W], float32) and the facts a registered model
version shows (architecture, parameters, corpus and its index hash, steps, objectives, final
losses); see `registry_details`. It loads with `AVViTModel.from_pretrained` (and `AutoModel`
once avssl is imported) and loading never unpickles: weights are safetensors only. The decoder
used for masked data modeling is not released; continue pretraining from the DeepSpeed
checkpoint instead.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from avssl import AvsslError
from avssl.cluster.checkpoint import DS_TAG, MODEL_STATES, load_tensors, weights_only_deepspeed
from avssl.cluster.checkpoint import latest_checkpoint  # noqa: F401  (the CLI and finetune import it from here)
from avssl.cluster.config import PretrainRecipe
from avssl.config import load_config, to_yaml

FEATURES_FILE = "avssl_features.json"
MLMODEL_FILE = "MLmodel"  # MLflow's model description: input signature, and avssl's facts as metadata
RUN_CONFIG = "config.yaml"  # in <storage>/<name>/avssl/
PRETRAINED_PURPOSE = (
    "One ViT backbone shared by audio (log-mel filterbank) and video (face frames), pretrained\n"
    "without labels by contrastive learning with asymmetric masking plus masked data modeling."
)


def consolidated_state_dict(checkpoint_dir: Path, tag: str = DS_TAG) -> dict[str, torch.Tensor]:
    """fp32 weights from a DeepSpeed checkpoint of any ZeRO stage (zero_to_fp32 for 1-3), read
    without unpickling (cluster/checkpoint.py): a file holding Python objects is refused."""
    tag_dir = checkpoint_dir / tag
    if not tag_dir.is_dir():
        raise AvsslError(f"{checkpoint_dir}: no DeepSpeed checkpoint (expected a {tag}/ folder)")
    if any(tag_dir.glob("*optim_states.pt")) and any(tag_dir.glob("zero_pp_rank_*")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with weights_only_deepspeed():
            return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=tag)
    # ZeRO-0: rank 0's model file holds the full module.
    states = load_tensors(tag_dir / MODEL_STATES)
    if not isinstance(states, dict) or not isinstance(states.get("module"), dict):
        raise AvsslError(f"{tag_dir / MODEL_STATES}: not a DeepSpeed model file (no 'module' weights)")
    return {k: v.float() for k, v in states["module"].items()}


def run_recipe(checkpoint: Path) -> PretrainRecipe:
    """The resolved recipe saved with the run (<run>/avssl/config.yaml)."""
    path = checkpoint.parent / "avssl" / RUN_CONFIG
    if not path.is_file():
        raise AvsslError(f"{path}: the run's resolved config is missing; pass the run directory of an avssl run")
    return load_config(PretrainRecipe, path)


def load_consolidated(model: torch.nn.Module, checkpoint: Path) -> torch.nn.Module:
    """Load a DeepSpeed checkpoint's consolidated weights into a freshly built model. Frozen
    parameters (the fixed sin-cos position tables, a frozen backbone) are not in ZeRO's
    consolidated weights; they never changed, so the fresh model's values are right."""
    missing, unexpected = model.load_state_dict(consolidated_state_dict(checkpoint), strict=False)
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    missing = [k for k in missing if k not in frozen]
    if missing or unexpected:
        raise AvsslError(f"{checkpoint}: weights do not fit the recipe's model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model


def feature_settings(recipe: Any) -> dict[str, Any]:
    """What reproduces a model's inputs: fbank settings and statistics, clip length, face size."""
    from avssl.data.features import load_stats

    try:
        stats = load_stats(Path(recipe.data.corpus)).model_dump()
    except AvsslError:
        stats = None
    return {
        "features": recipe.features.model_dump(mode="json"),
        "fbank_stats": stats,
        "clip_seconds": recipe.data.clip_seconds,
        "modalities": recipe.data.modalities,
    }


@contextmanager
def atomic_directory(out: Path) -> Iterator[Path]:
    """Build a directory beside `out` and rename it into place only when complete."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def export_release(checkpoint: Path, out: Path, recipe: PretrainRecipe, metrics: dict[str, Any] | None = None) -> Path:
    """Write the backbone release directory atomically."""
    from avssl.pretrain.config import build_model

    checkpoint, out = Path(checkpoint), Path(out)
    model = load_consolidated(build_model(recipe.model, recipe.masking, recipe.loss), checkpoint)
    with atomic_directory(out) as tmp:
        model.avvit.save_pretrained(tmp, safe_serialization=True)
        (tmp / FEATURES_FILE).write_text(json.dumps(feature_settings(recipe), indent=2))
        (tmp / "README.md").write_text(model_card(recipe, checkpoint, metrics or {}))
        parameters = sum(p.numel() for p in model.avvit.parameters())
        write_mlmodel(tmp, model.avvit.config, release_facts(recipe, parameters, checkpoint, metrics or {},
                                                             pretraining_objectives(recipe)))
    return out


def corpus_hash(corpus: str | Path) -> str | None:
    """sha256 of the corpus index, which lists every shard with its sample count and size (a
    corpus written again differently, or grown, gets another); None without an index. The
    shards themselves are not read: hashing a corpus of many GB would hold up every export."""
    from avssl.data.shards import INDEX_FILE

    try:
        return hashlib.sha256((Path(corpus) / INDEX_FILE).read_bytes()).hexdigest()
    except OSError:
        return None


def pretraining_objectives(recipe: Any) -> list[str]:
    """The losses a pretraining run optimized: weight above 0, and trainable on its corpus."""
    from avssl.cluster.launch import objectives_off  # launch imports this module: no cycle at import time
    from avssl.data.shards import CorpusIndex

    loss = recipe.loss
    rec = loss.reconstruction_weight > 0
    weighted = {"loss_contrastive": loss.contrastive_weight > 0,
                "loss_rec_audio": rec and loss.audio_reconstruction_weight > 0,
                "loss_rec_video": rec and loss.video_reconstruction_weight > 0,
                "loss_segment": loss.segment_weight > 0}
    try:
        off = {reason.split(" ", 1)[0] for reason in
               objectives_off(recipe, CorpusIndex.load(recipe.data.corpus).modalities(recipe.data.split))}
    except AvsslError:  # the corpus is gone (exporting an old run elsewhere): the recipe's view
        off = set()
    return [name for name, on in weighted.items() if on and name not in off]


def release_facts(recipe: Any, parameters: int, checkpoint: Path, metrics: dict[str, Any],
                  objectives: list[str], arch: str | None = None) -> dict[str, Any]:
    """What a registered model version says about a release (kept in its MLmodel's metadata);
    `arch`: the backbone's architecture where the recipe's model section does not give it."""
    losses = {k: round(float(v), 6) for k, v in sorted(metrics.items()) if k.startswith("loss") or k.endswith("accuracy")}
    step = metrics.get("step")
    if step is None:  # `avssl export RUN`: the checkpoint's own train state
        from avssl.cluster.checkpoint import STATE_FILE

        try:
            step = json.loads((Path(checkpoint) / STATE_FILE).read_text()).get("step")
        except (OSError, ValueError):
            step = None
    return {
        "arch": arch or recipe.model.arch,
        "parameters": int(parameters),
        "corpus": str(recipe.data.corpus),
        "corpus_hash": corpus_hash(recipe.data.corpus),
        "steps": int(step) if step is not None else None,
        "objectives": objectives,
        "final_metrics": losses,
        "checkpoint": str(checkpoint),
        "run": recipe.trainer.name,
    }


def release_arch(release: Path, config: Any) -> str:
    """The architecture of the backbone in a release: as its MLmodel records it, else its size."""
    import yaml

    try:
        return yaml.safe_load((Path(release) / MLMODEL_FILE).read_text())["metadata"]["avssl"]["arch"]
    except (OSError, KeyError, TypeError, yaml.YAMLError):  # a release written before MLmodel
        return f"avvit (width {config.hidden_size}, {config.num_hidden_layers} layers)"


def input_signature(config: Any):
    """The inputs the backbone takes, from its config: audio [-1, T, F] log-mel frames and video
    [-1, V, 3, H, W] face frames, float32, normalized as `avssl_features.json` says."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    size = config.video_image_size
    size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
    return ModelSignature(inputs=Schema([
        TensorSpec(np.dtype("float32"), (-1, config.audio_num_frames, config.audio_num_mel_bins), "audio"),
        TensorSpec(np.dtype("float32"), (-1, config.video_num_frames, 3, *size), "video"),
    ]))


def write_mlmodel(out: Path, config: Any, facts: dict[str, Any]) -> Path:
    """MLflow's model description of a release whose backbone has `config` (no MLflow flavor:
    a release loads with transformers)."""
    from mlflow.models import Model

    path = Path(out) / MLMODEL_FILE
    Model(signature=input_signature(config), metadata={"avssl": facts}).save(path)
    return path


def registry_details(release: Path) -> tuple[str, dict[str, str]]:
    """(description, tags) of the model version registered from a release: architecture,
    parameters, corpus and its index hash, steps, objectives, final losses, and the evaluation
    report if one is already beside the release (<run>/avssl/eval; `avssl finetune` evaluates
    after it registers, so only a re-run finds its own). A release without MLmodel: none."""
    import yaml

    release = Path(release)
    try:
        mlmodel = yaml.safe_load((release / MLMODEL_FILE).read_text()) or {}
    except (OSError, yaml.YAMLError):
        return "", {}
    facts = (mlmodel.get("metadata") or {}).get("avssl") or {}
    inputs = json.loads((mlmodel.get("signature") or {}).get("inputs") or "[]")
    shapes = ", ".join(f"{i['name']} {i['tensor-spec']['shape']} {i['tensor-spec']['dtype']}" for i in inputs)
    lines = [
        f"**{facts.get('arch')}**, {facts.get('parameters', 0):,} parameters, {facts.get('steps')} steps "
        f"(avssl run `{facts.get('run')}`).",
        "",
        f"- corpus: `{facts.get('corpus')}` (index sha256 `{facts.get('corpus_hash') or 'unknown'}`)",
        f"- objectives: {', '.join(facts.get('objectives') or []) or 'none recorded'}",
        f"- final metrics: {', '.join(f'{k} {v:.4g}' for k, v in (facts.get('final_metrics') or {}).items()) or 'none'}",
        f"- inputs: {shapes} (features as in `{FEATURES_FILE}`)",
        f"- checkpoint: `{facts.get('checkpoint')}`",
    ]
    report = release.parent / "eval" / "report.json"
    if report.is_file():
        results = json.loads(report.read_text()).get("results", {})
        for mode, values in results.items():
            numbers = ", ".join(f"{k} {v:.4g}" for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
            lines.append(f"- evaluation ({mode}): {numbers}")
    tags = {"arch": str(facts.get("arch")), "steps": str(facts.get("steps")),
            "corpus_hash": str(facts.get("corpus_hash") or "unknown"), "objectives": ",".join(facts.get("objectives") or []),
            "parameters": str(facts.get("parameters"))}
    return "\n".join(lines), tags


def model_card(recipe: Any, checkpoint: Path, metrics: dict[str, Any], purpose: str | None = None) -> str:
    from avssl.cluster.tracking import public_recipe  # the card is published: no tracking credentials

    rows = "\n".join(f"| {k} | {v:.6g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in sorted(metrics.items()))
    return f"""---
library_name: transformers
tags: [avssl, audio-visual, self-supervised, speech]
---
# {recipe.trainer.name}: avssl audio-visual ViT ({recipe.model.arch})

{purpose or PRETRAINED_PURPOSE}

```python
import avssl.pretrain.modeling  # registers the avvit model type with transformers
from transformers import AutoModel
model = AutoModel.from_pretrained("path/to/this/folder")
```

Inputs must be made as in training: see `{FEATURES_FILE}` (fbank settings, normalization
statistics, clip length, face size).

Exported from `{checkpoint}`.

## Final metrics

| metric | value |
| --- | --- |
{rows}

## Training config

```yaml
{to_yaml(public_recipe(recipe))}```
"""
