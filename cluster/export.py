"""Released checkpoints: DeepSpeed (ZeRO) shards -> a Hugging Face-format directory.

A release holds the backbone (`AVViTModel`) as safetensors with its config, the feature
settings needed to reproduce its inputs (`avssl_features.json`: filterbank parameters,
normalization statistics, clip length, image size), and a model card (`README.md`) with the
training config and final metrics. It loads with `AVViTModel.from_pretrained` (and `AutoModel`
once avssl is imported) and loading never unpickles: weights are safetensors only. The decoder
used for masked data modeling is not released; continue pretraining from the DeepSpeed
checkpoint instead.
"""

from __future__ import annotations

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
    return out


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
