"""Proof that pretraining helps: pretrained vs randomly initialized backbone, same head and budget.

`avssl prove --pretrained runs/demo/avssl/release` finetunes each task's recipe twice on the
same runner (Ray + DeepSpeed, one local Ray instance for all runs): once from the pretrained
release, once from a random initialization of the same architecture, with identical heads,
data, steps and seeds. Both are evaluated in every modality setting (AV, A, V), and the
zero-shot speaker-verification EER of both backbones (no finetuning at all) is added. The table
is printed, written as JSON and Markdown, and logged to MLflow (experiment avssl-proof).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from avssl.config import load_config
from avssl.finetune.evaluate import evaluate
from avssl.finetune.recipe import FinetuneRecipe
from avssl.io import atomic_write_text, write_json

REPO_CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "finetune"
TASKS = ("speaker", "emotion", "spoof")
# The headline number per task and whether lower is better.
HEADLINE = {"speaker": ("eer", True), "emotion": ("unweighted_accuracy", False), "spoof": ("eer", True)}


def random_backbone_release(pretrained: Path, out: Path) -> Path:
    """A randomly initialized backbone with the pretrained one's config and feature settings."""
    import shutil

    import torch

    from avssl.cluster.export import FEATURES_FILE
    from avssl.pretrain.configuration import AVViTConfig
    from avssl.pretrain.modeling import AVViTModel

    if (out / "config.json").is_file():
        return out
    torch.manual_seed(0)
    AVViTModel(AVViTConfig.from_pretrained(pretrained)).save_pretrained(out, safe_serialization=True)
    shutil.copy(pretrained / FEATURES_FILE, out / FEATURES_FILE)
    return out


def release_tag(release: Path) -> str:
    """A short content hash of a release's weights: proof runs are named by it, so re-running the
    proof after a new pretraining trains afresh instead of resuming the old backbone's runs."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted(Path(release).glob("*.safetensors")):
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:8]


def prove(pretrained: Path, corpus: Path, out: Path, steps: int, storage: Path, tasks: tuple[str, ...] = TASKS,
          overrides: list[str] | None = None) -> dict[str, Any]:
    from avssl.finetune.runner import run_finetuning

    pretrained, corpus, out = Path(pretrained).resolve(), Path(corpus).resolve(), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tag = release_tag(pretrained)
    random_release = random_backbone_release(pretrained, out / f"random_backbone-{tag}")
    rows: list[dict[str, Any]] = []
    for init_name, release in (("pretrained", pretrained), ("random", random_release)):
        zs = evaluate(release, corpus, out / f"zeroshot_{init_name}", zero_shot=True)
        for mode, r in zs["results"].items():
            rows.append({"task": "speaker (zero-shot)", "mode": mode, "init": init_name, "metric": "eer", "value": r["eer"],
                         "n": effective_n(r)})
    for task in tasks:
        for init_name, release in (("pretrained", pretrained), ("random", random_release)):
            recipe = load_config(FinetuneRecipe, REPO_CONFIGS / f"{task}.yaml", [
                f"data.corpus={corpus}", f"trainer.storage_path={storage}", f"trainer.name=prove-{task}-{init_name}-{tag}",
                f"trainer.total_steps={steps}", f"trainer.checkpoint_every={steps}", f"init.source={release}",
                f"mlflow.experiment=avssl-proof", *(overrides or []),
            ])
            result = run_finetuning(recipe)
            report = evaluate(result.release, corpus, out / f"{task}_{init_name}", split=recipe.eval.split,
                              trials=corpus / recipe.eval.trials if recipe.eval.trials else None)
            metric, _ = HEADLINE[task]
            for mode, r in report["results"].items():
                rows.append({"task": task, "mode": mode, "init": init_name, "metric": metric, "value": r[metric],
                             "n": effective_n(r)})
    table = comparison(rows)
    write_json(out / "proof.json", {"pretrained": str(pretrained), "corpus": str(corpus), "steps": steps, "rows": rows, "table": table})
    atomic_write_text(out / "proof.md", markdown(table, steps))
    run_id = log_proof(recipe, pretrained, tag, out, table)
    return {"rows": rows, "table": table, "mlflow_run_id": run_id}


def log_proof(recipe: FinetuneRecipe, pretrained: Path, tag: str, out: Path, table: list[dict[str, Any]]) -> str:
    """One MLflow run (the finetuning runs' experiment and store) holding the table as metrics
    (`proof.<task>.<modality>.{pretrained,random,gain,clear_margin}`) and proof.md / proof.json."""
    from avssl.cluster.tracking import MlflowLogger, open_run, resolve_tracking_uri

    uri = resolve_tracking_uri(recipe.mlflow, recipe.trainer.storage_path)
    run_id = open_run(recipe.mlflow, uri, f"proof-{tag}", recipe.trainer.storage_path)
    logger = MlflowLogger(uri, run_id, recipe.mlflow)
    logger.set_tags({"avssl.pretrained": str(pretrained), "avssl.kind": "proof"})
    metrics = {}
    for t in table:
        key = f"proof.{t['task'].replace(' (zero-shot)', '_zero_shot')}.{t['mode'].lower()}"
        for field in ("pretrained", "random", "gain", "clear_margin"):
            metrics[f"{key}.{field}"] = float(t[field])
    logger.log_metrics(metrics, step=0)
    logger.log_artifact(out / "proof.md", "proof")
    logger.log_artifact(out / "proof.json", "proof")
    logger.finish(status="FINISHED", timeout_s=60)
    return run_id


def effective_n(result: dict[str, Any]) -> int:
    """Samples behind a rate: the smaller class of a binary task (EER), else the clips scored (UA)."""
    if "num_target" in result:
        return int(min(result["num_target"], result["num_nontarget"]))
    return int(result.get("n", 0))


def clear_margin(p: float, q: float, n: int) -> float:
    """Two standard errors of the difference of two rates p, q (in [0, 1]) each measured on n
    samples: sqrt(p(1-p)/n + q(1-q)/n) x 2. A difference beyond it is a clear margin, not chance."""
    if n <= 0:
        return float("inf")
    return 2.0 * math.sqrt((p * (1 - p) + q * (1 - q)) / n)


def comparison(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One line per (task, mode): pretrained and random values, whether pretrained is better, and
    whether by a clear margin (more than two standard errors of the difference, `clear_margin`)."""
    by = {(r["task"], r["mode"], r["init"]): r for r in rows}
    out = []
    for (task, mode, init) in by:
        if init != "pretrained" or (task, mode, "random") not in by:
            continue
        p, q = by[(task, mode, "pretrained")], by[(task, mode, "random")]
        lower = p["metric"] == "eer"
        gain = (q["value"] - p["value"]) if lower else (p["value"] - q["value"])
        margin = clear_margin(p["value"], q["value"], min(p.get("n", 0), q.get("n", 0)))
        out.append({"task": task, "mode": mode.upper(), "metric": "EER %" if lower else "UA %",
                    "pretrained": 100 * p["value"], "random": 100 * q["value"], "gain": 100 * gain,
                    "clear_margin": 100 * margin, "pretrained_better": gain > 0, "clearly_better": gain > margin})
    return out


def markdown(table: list[dict[str, Any]], steps: int) -> str:
    lines = [f"Pretrained vs random backbone, same head, data and {steps} finetuning steps (lower EER, higher UA is better;",
             "gain in points, clear = gain beyond two standard errors of the difference).", "",
             "| task | modality | metric | pretrained | random | gain | clear margin |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for t in table:
        verdict = "yes" if t["clearly_better"] else ("better, within noise" if t["pretrained_better"] else "no")
        lines.append(f"| {t['task']} | {t['mode']} | {t['metric']} | {t['pretrained']:.1f} | {t['random']:.1f} | "
                     f"{t['gain']:+.1f} (±{t['clear_margin']:.1f}) | {verdict} |")
    return "\n".join(lines) + "\n"
