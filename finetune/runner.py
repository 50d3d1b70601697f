"""Finetuning on the pretraining runner: Ray workers, DeepSpeed, checkpoints, resume, MLflow.

`run_finetuning(recipe)` resolves where the backbone comes from (a release directory, a
pretraining run's latest checkpoint, or an MLflow model URI), copies it into the run's storage
so that every node reads the same weights, and runs the shared driver with the finetuning
workload. The finetuned release holds the backbone (`backbone/`, Hugging Face format), the
head (`head.safetensors`, `head.json`), the label names and the feature settings.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from avssl import AvsslError
from avssl.cluster.export import FEATURES_FILE, export_release, latest_checkpoint, run_recipe
from avssl.cluster.train import Workload, batch_inputs, tokens_per_sample
from avssl.finetune.labels import LabelConfig, LabelMap
from avssl.finetune.recipe import FinetuneRecipe

HEAD_WEIGHTS = "head.safetensors"
HEAD_CONFIG = "head.json"
LABELS_FILE = "labels.json"
LABEL_SOURCE_FILE = "label_source.json"  # emotion: where evaluation reads a sample's label (LabelConfig)
SPOOF_LABELS = ["spoof", "bonafide"]  # class index 1 = bona fide: scores are P(bona fide)


def resolve_init(source: str, dest: Path) -> Path:
    """Any supported SOURCE -> a release directory at `dest` (in the run's shared storage)."""
    if (dest / "config.json").is_file():
        return dest  # resumed run: already resolved
    dest.parent.mkdir(parents=True, exist_ok=True)
    if source.startswith("models:/") or source.startswith("runs:/"):
        import mlflow.artifacts

        with tempfile.TemporaryDirectory() as tmp:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=tmp))
            release = local if (local / "config.json").is_file() else next(local.rglob("config.json"), None)
            if release is None:
                raise AvsslError(f"{source}: the registered model holds no avssl release (no config.json)")
            shutil.copytree(release.parent if release.name == "config.json" else release, dest)
        return dest
    path = Path(source)
    if (path / "config.json").is_file():
        shutil.copytree(path / "backbone" if (path / "backbone" / "config.json").is_file() else path, dest)
        for extra in (FEATURES_FILE,):
            if (path / extra).is_file() and not (dest / extra).is_file():
                shutil.copy(path / extra, dest / extra)
        return dest
    if path.is_dir():
        checkpoint = latest_checkpoint(path)
        return export_release(checkpoint, dest, run_recipe(checkpoint))
    raise AvsslError(
        f"--init {source}: not a release directory (config.json), a run directory (checkpoint_*) or models:/NAME/VERSION"
    )


def check_release_fits(release: Path, recipe: FinetuneRecipe) -> None:
    """The data pipeline must produce what the released backbone was trained on."""
    cfg = json.loads((release / "config.json").read_text())
    f = recipe.features
    for key, want in (("audio_num_mel_bins", f.num_mel_bins), ("video_image_size", f.image_size)):
        if key in cfg and cfg[key] != want:
            raise AvsslError(f"{release}: the backbone expects {key}={cfg[key]} but the recipe's features give {want}; "
                             f"set features.{'num_mel_bins' if 'mel' in key else 'image_size'}={cfg[key]}")


def label_names(recipe: FinetuneRecipe) -> list[str]:
    from avssl.data.shards import CorpusIndex

    task = recipe.head.task
    if task == "emotion":
        return recipe.labels.class_names()
    if task == "spoof":
        return list(SPOOF_LABELS)
    speakers = CorpusIndex.load(recipe.data.corpus).speakers(recipe.data.split)
    if len(speakers) < 2:
        raise AvsslError(f"{recipe.data.corpus}: speaker training needs at least 2 speakers in split {recipe.data.split!r}")
    return speakers


def head_config(recipe: FinetuneRecipe, labels: list[str]):
    return recipe.head.model_copy(update={"num_classes": len(labels)})


def build_task_model(recipe: FinetuneRecipe, labels: list[str], init_dir: str | None):
    """Backbone from the release (or random init of `recipe.model`) + the task head."""
    from avssl.finetune.heads import TaskModel
    from avssl.pretrain.config import avvit_config_from_sections
    from avssl.pretrain.modeling import AVViTModel

    if init_dir:
        backbone = AVViTModel.from_pretrained(init_dir)
    else:
        backbone = AVViTModel(avvit_config_from_sections(recipe.model))
    return TaskModel(backbone, head_config(recipe, labels))


def batch_labels(task: str, batch: dict[str, Any], label_index: dict[str, int], label_map: LabelMap | None) -> torch.Tensor:
    """Class indices of a batch: emotion through `label_map` (required), spoof from is_spoof, speaker by name."""
    if task == "emotion":
        return label_map(batch["meta"])
    if task == "spoof":
        return batch["is_spoof"]
    return torch.tensor([label_index[m["speaker"]] for m in batch["meta"]])


class FinetuneWorkload(Workload):
    keys = ("loss", "accuracy")

    def __init__(self, recipe: FinetuneRecipe, labels: list[str], init_dir: str | None) -> None:
        self.recipe, self.labels, self.init_dir = recipe, labels, init_dir
        self.index = {name: i for i, name in enumerate(labels)}
        self.label_map = LabelMap(recipe.labels) if recipe.head.task == "emotion" else None
        self._targets: torch.Tensor | None = None
        if recipe.head.late_weights == "learned":  # logged: how far the AV prediction leans on video
            self.keys = (*self.keys, "late_weight_video")
        # logged: the layer each branch's mix reads on average (0 = embedding output, L = last layer)
        from avssl.finetune.heads import pooling_branches

        self.mix_branches = () if recipe.head.layer_weights == "last" else pooling_branches(recipe.head.fusion)
        self.keys = (*self.keys, *(f"layer_centre_{b}" for b in self.mix_branches))

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "FinetuneWorkload":
        return cls(FinetuneRecipe.model_validate(config["recipe"]), config["labels"], config.get("init_dir"))

    def build(self, world: int):
        model = build_task_model(self.recipe, self.labels, self.init_dir)
        self._model = model
        return model, model.param_groups(self.recipe.optim.weight_decay)

    def inputs(self, batch: dict[str, Any], device: torch.device, step: int) -> dict[str, Any]:
        labels = batch_labels(self.recipe.head.task, batch, self.index, self.label_map).to(device)
        # The class indices the logits are over (spoof: 1 = bona fide), -1 = unlabelled.
        self._targets = self._model.targets(labels)
        return {**batch_inputs(batch, device), "labels": labels, "step": step}

    def values(self, out: Any) -> list[torch.Tensor | None]:
        accuracy = None
        if out.logits is not None and self._targets is not None:
            labelled = self._targets >= 0
            hits = (out.logits.argmax(-1) == self._targets) & labelled
            accuracy = hits.sum().float() / labelled.sum().clamp(min=1)
        weights = self._model.late_weights()
        centres = []
        for branch in self.mix_branches:
            mix = self._model.layer_weights(branch).detach()
            centres.append((mix * torch.arange(mix.numel(), device=mix.device)).sum())
        return [out.loss, accuracy] + ([weights[1].detach()] if weights is not None else []) + centres

    def tokens(self, model: torch.nn.Module, batch: dict[str, Any]) -> int:
        return tokens_per_sample(model.backbone.config, batch)


def export_finetuned(checkpoint: Path, out: Path, recipe: FinetuneRecipe, labels: list[str], init_dir: str | None,
                     metrics: dict[str, Any] | None = None) -> Path:
    """Backbone (HF format) + head (safetensors) + labels + feature settings, written atomically."""
    from safetensors.torch import save_file

    from avssl.cluster.export import (atomic_directory, feature_settings, load_consolidated, model_card, release_arch,
                                      release_facts, write_mlmodel)

    model = load_consolidated(build_task_model(recipe, labels, init_dir), checkpoint)
    with atomic_directory(Path(out)) as tmp:
        model.backbone.save_pretrained(tmp / "backbone", safe_serialization=True)
        head = {k: v.detach().contiguous() for k, v in model.state_dict().items() if not k.startswith("backbone.")}
        save_file(head, tmp / HEAD_WEIGHTS)
        (tmp / HEAD_CONFIG).write_text(head_config(recipe, labels).model_dump_json(indent=2))
        (tmp / LABELS_FILE).write_text(json.dumps(labels))
        if recipe.head.task == "emotion":
            (tmp / LABEL_SOURCE_FILE).write_text(recipe.labels.model_dump_json(indent=2))
        (tmp / FEATURES_FILE).write_text(json.dumps(feature_settings(recipe), indent=2))
        purpose = f"The shared audio-visual ViT backbone finetuned for {recipe.head.task} with a {recipe.head.fusion}-fusion head."
        (tmp / "README.md").write_text(model_card(recipe, checkpoint, metrics or {}, purpose))
        facts = release_facts(recipe, sum(p.numel() for p in model.parameters()), checkpoint, metrics or {},
                              [f"{recipe.head.task} head ({recipe.head.fusion} fusion)"],
                              arch=release_arch(Path(init_dir), model.backbone.config) if init_dir else None)
        write_mlmodel(tmp, model.backbone.config, facts)
    return Path(out)


def load_task_model(release: Path):
    """A finetuned release -> (TaskModel in eval mode, labels, feature settings). Never unpickles."""
    from safetensors.torch import load_file

    from avssl.config import validate
    from avssl.finetune.config import HeadConfig
    from avssl.finetune.heads import TaskModel
    from avssl.pretrain.modeling import AVViTModel

    release = Path(release)
    if not (release / HEAD_WEIGHTS).is_file():
        raise AvsslError(f"{release}: not a finetuned release (no {HEAD_WEIGHTS}); finetune with `avssl finetune`")
    head = validate(HeadConfig, json.loads((release / HEAD_CONFIG).read_text()), str(release / HEAD_CONFIG))
    model = TaskModel(AVViTModel.from_pretrained(release / "backbone"), head)
    weights = load_file(release / HEAD_WEIGHTS)
    shapes = model.state_dict()
    wrong = [(k, tuple(v.shape), tuple(shapes[k].shape)) for k, v in weights.items() if k in shapes and v.shape != shapes[k].shape]
    if wrong:
        key, got, want = wrong[0]
        raise AvsslError(
            f"{release}: {HEAD_WEIGHTS} was trained on another model size than {release / 'backbone'} holds "
            f"({key}: {got} in the file, {want} for this backbone of width {model.backbone.config.hidden_size}); "
            "the release mixes files of two models: use a release folder exactly as `avssl finetune` wrote it")
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not k.startswith("backbone.")]
    if missing or unexpected:
        raise AvsslError(f"{release}: head weights do not fit its head.json (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.eval(), json.loads((release / LABELS_FILE).read_text()), json.loads((release / FEATURES_FILE).read_text())


def release_label_map(release: Path, csv_path: str | Path | None = None) -> LabelMap:
    """The label map an emotion release was trained with (default: CREMA-D's six from metadata);
    `csv_path` replaces its label CSV (the labels of another corpus)."""
    from avssl.config import validate

    path = Path(release) / LABEL_SOURCE_FILE
    cfg = validate(LabelConfig, json.loads(path.read_text()), str(path)) if path.is_file() else LabelConfig()
    names = json.loads((Path(release) / LABELS_FILE).read_text())
    if cfg.class_names() != names:
        cfg = cfg.model_copy(update={"names": names})
    return LabelMap(cfg, csv_path)


def run_finetuning(recipe: FinetuneRecipe, address: str | None = None):
    from avssl.cluster.launch import check_corpus, run_training

    recipe = check_corpus(recipe)
    if recipe.labels.csv is not None:  # workers run in their own directory: pass an absolute path
        csv_path = str(Path(recipe.labels.csv).resolve())
        recipe = recipe.model_copy(update={"labels": recipe.labels.model_copy(update={"csv": csv_path})})
    if recipe.head.task == "emotion":
        LabelMap(recipe.labels)  # a bad label CSV fails here, naming its line, before any worker starts
    labels = label_names(recipe)
    state: dict[str, Any] = {}

    def prepare(run_dir: Path) -> dict[str, Any]:
        init_dir = None
        if recipe.init.source:
            init_dir = resolve_init(recipe.init.source, run_dir / "avssl" / "init")
            check_release_fits(init_dir, recipe)
        state["init_dir"] = str(init_dir) if init_dir else None
        return {"workload": "avssl.finetune.runner:FinetuneWorkload", "labels": labels, "init_dir": state["init_dir"]}

    def export(checkpoint: Path, out: Path, metrics: dict[str, Any]) -> Path:
        return export_finetuned(checkpoint, out, recipe, labels, state["init_dir"], metrics)

    return run_training(recipe, address, kind="finetune", export=export, prepare=prepare)
