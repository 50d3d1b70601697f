"""Proof that pretraining helps: pretrained vs randomly initialized backbone, same head and budget.

`avssl prove --pretrained runs/demo/avssl/release` finetunes each task's recipe twice on the
same runner (Ray + DeepSpeed, one local Ray instance for all runs): once from the pretrained
release, once from a random initialization of the same architecture, with identical heads,
data, steps and seeds. Both are evaluated in every modality setting (AV, A, V), and the
zero-shot speaker-verification EER of both backbones (no finetuning at all) is added. The table
is printed, written as JSON and Markdown, and logged to MLflow (experiment avssl-proof).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from avssl import AvsslError
from avssl.config import load_config
from avssl.finetune import metrics as M
from avssl.finetune.evaluate import evaluate, headline, pool_scores, read_scores, score_file
from avssl.finetune.recipe import FinetuneRecipe
from avssl.io import atomic_write_text, write_json

TASKS = ("speaker", "emotion", "spoof")
# Bootstrap resamples behind each clear-margin verdict (about 1 s per row on the demo's test split).
RESAMPLES = 1000
# The headline number per task and whether lower is better.
HEADLINE = {"speaker": ("eer", True), "emotion": ("unweighted_accuracy", False), "spoof": ("eer", True)}


def random_backbone_release(pretrained: Path, out: Path) -> Path:
    """A randomly initialized backbone (seed 0) with the pretrained one's config and feature
    settings, written to `out` whole or not at all; an `out` already written is returned as it is."""
    import shutil

    import torch

    from avssl.cluster.export import FEATURES_FILE, atomic_directory
    from avssl.pretrain.configuration import AVViTConfig
    from avssl.pretrain.modeling import AVViTModel

    if (out / "config.json").is_file():
        return out
    torch.manual_seed(0)
    with atomic_directory(out) as tmp:
        AVViTModel(AVViTConfig.from_pretrained(pretrained)).save_pretrained(tmp, safe_serialization=True)
        shutil.copy(pretrained / FEATURES_FILE, tmp / FEATURES_FILE)
    return out


def _content_tag(paths: list[Path]) -> str:
    import hashlib

    digest = hashlib.sha256()
    for path in paths:
        if not path.is_file():
            continue
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:8]


def release_tag(release: Path) -> str:
    """A short content hash of a release's weights, model config and feature settings: proof runs
    are named by it, so re-running the proof after a new pretraining trains afresh instead of
    resuming the old backbone's runs, while the random backbone (the same weights for every release
    of one config) keeps its tag, and its finished runs are kept, across releases of one recipe and
    corpus. The config is in the hash because some of its fields change the forward pass without
    changing the weights (hidden_act, layer_norm_eps, dropout)."""
    from avssl.cluster.export import FEATURES_FILE

    release = Path(release)
    return _content_tag([*sorted(release.glob("*.safetensors")), release / "config.json", release / FEATURES_FILE])


def config_tag(release: Path) -> str:
    """A short hash of a release's model config and feature settings, without its weights: the
    random backbone of every release of one config is one folder in the proof's storage, so its
    runs, whose recipes name that folder, are found finished by any later proof instead of retrained."""
    from avssl.cluster.export import FEATURES_FILE

    return _content_tag([Path(release) / "config.json", Path(release) / FEATURES_FILE])


def recipe_tag(recipe: FinetuneRecipe) -> str:
    """A short hash of a resolved proof recipe (overrides included) without its run name and init:
    a linear-probe proof and a full-finetuning proof, or the same proof after a recipe change, get
    their own runs instead of resuming each other's. The corpus enters by its content (its
    index.json, which lists every shard's size and count), not by its path, and the storage folder
    not at all: a moved or re-cloned checkout resumes its proof runs instead of retraining them."""
    import hashlib
    import json

    tree = recipe.model_dump(mode="json")
    tree["trainer"].pop("name", None)
    tree["trainer"].pop("storage_path", None)
    tree["init"].pop("source", None)
    index = Path(recipe.data.corpus) / "index.json"
    if index.is_file():
        tree["data"]["corpus"] = hashlib.sha256(index.read_bytes()).hexdigest()
    return hashlib.sha256(json.dumps(tree, sort_keys=True).encode()).hexdigest()[:6]


def packaged_recipes() -> Path:
    """The finetuning recipes shipped with avssl (configs/finetune of the source tree, `avssl/configs/finetune`
    of an installed wheel)."""
    from importlib.resources import files

    return Path(str(files("avssl.configs") / "finetune"))


def prove(pretrained: Path, corpus: Path, out: Path, steps: int, storage: Path, tasks: tuple[str, ...] = TASKS,
          overrides: list[str] | None = None, seeds: tuple[int, ...] = (0,), recipes: Path | None = None) -> dict[str, Any]:
    """The table. Each task's head is trained with `recipes/<task>.yaml` (default: the packaged recipes). With several `seeds`, each task's head is trained once per seed (trainer.seed)
    from each backbone, and every clip's (or trial's) scores are averaged over the seeds before the
    verdict (evaluate.pool_scores): the bootstrap then measures the test speakers' spread, not one
    head initialization's luck. Each seed's own gain is kept in the table (`seed_gains`)."""
    from avssl.finetune.runner import run_finetuning

    recipes = recipes or packaged_recipes()
    for task in tasks:
        if not (recipes / f"{task}.yaml").is_file():
            raise AvsslError(f"{recipes / f'{task}.yaml'}: no finetuning recipe for {task}; pass --recipes DIR holding {task}.yaml")

    pretrained, corpus, out = Path(pretrained).resolve(), Path(corpus).resolve(), Path(out)
    seeds = tuple(dict.fromkeys(int(s) for s in seeds))
    if not seeds:
        raise AvsslError("--seeds: give at least one head seed, e.g. --seeds 0 1 2")
    if len(seeds) > 1 and any(o.split("=", 1)[0].strip() == "trainer.seed" for o in overrides or []):
        raise AvsslError("--set trainer.seed and --seeds both choose the head seed: drop --set trainer.seed "
                         "(with --seeds the proof trains one head per seed and pools their scores)")
    out.mkdir(parents=True, exist_ok=True)
    tag = release_tag(pretrained)
    random_release = random_backbone_release(pretrained, (Path(storage) / f"random_backbone-{config_tag(pretrained)}").resolve())
    tags = {"pretrained": tag, "random": release_tag(random_release)}
    rows: list[dict[str, Any]] = []
    for init_name, release in (("pretrained", pretrained), ("random", random_release)):
        zs = evaluate(release, corpus, out / f"zeroshot_{init_name}", zero_shot=True)
        for mode, r in zs["results"].items():
            rows.append({"task": "speaker (zero-shot)", "mode": mode, "init": init_name, "metric": "eer", "value": r["eer"],
                         "n": effective_n(r), "scores": str(score_file(out / f"zeroshot_{init_name}", mode))})
    for task in tasks:
        for init_name, release in (("pretrained", pretrained), ("random", random_release)):
            report_dir = out / f"{task}_{init_name}"
            per_seed: dict[str, list[dict[str, Any]]] = {}
            for seed in seeds:
                seed_set = [f"trainer.seed={seed}"] if len(seeds) > 1 else []
                recipe = load_config(FinetuneRecipe, recipes / f"{task}.yaml", [
                    f"data.corpus={corpus}", f"trainer.storage_path={storage}", f"trainer.total_steps={steps}",
                    f"trainer.checkpoint_every={steps}", f"init.source={release}", f"mlflow.experiment=avssl-proof",
                    *(overrides or []), *seed_set,
                ])
                name = f"prove-{task}-{init_name}-{tags[init_name]}-{recipe_tag(recipe)}"
                recipe = recipe.model_copy(update={"trainer": recipe.trainer.model_copy(update={"name": name})})
                result = run_finetuning(recipe)
                seed_dir = report_dir / f"seed{seed}" if len(seeds) > 1 else report_dir
                report = evaluate(result.release, corpus, seed_dir, split=recipe.eval.split,
                                  trials=corpus / recipe.eval.trials if recipe.eval.trials else None)
                for mode, r in report["results"].items():
                    per_seed.setdefault(mode, []).append({"seed": recipe.trainer.seed, "n": effective_n(r),
                                                          "scores": score_file(seed_dir, mode)})
            metric, _ = HEADLINE[task]
            for mode, runs in per_seed.items():
                if len(runs) != len(seeds):
                    raise AvsslError(f"{task} {mode}: scored by {len(runs)} of the {len(seeds)} seeds' heads; "
                                     "every seed's evaluation must cover the same modes")
                pooled = score_file(report_dir, mode)
                if len(seeds) > 1:
                    pool_scores([r["scores"] for r in runs], pooled)
                rows.append({"task": task, "mode": mode, "init": init_name, "metric": metric, "value": headline(pooled),
                             "n": runs[0]["n"], "scores": str(pooled),
                             "seeds": [{"seed": r["seed"], "value": headline(r["scores"]), "scores": str(r["scores"])}
                                       for r in runs]})
    table, attacks = comparison(rows), attack_table(rows)
    write_json(out / "proof.json", {"pretrained": str(pretrained), "corpus": str(corpus), "steps": steps,
                                    "seeds": list(seeds), "rows": rows, "table": table, "attacks": attacks})
    atomic_write_text(out / "proof.md", markdown(table, steps, seeds, attacks))
    run_id = log_proof(recipe, pretrained, tag, out, table, seeds, attacks)
    return {"rows": rows, "table": table, "attacks": attacks, "mlflow_run_id": run_id}


def log_proof(recipe: FinetuneRecipe, pretrained: Path, tag: str, out: Path, table: list[dict[str, Any]],
              seeds: tuple[int, ...] = (0,), attacks: list[dict[str, Any]] | None = None) -> str:
    """One MLflow run (the finetuning runs' experiment and store) holding the table as metrics
    (`proof.<task>.<modality>.{pretrained,random,gain,clear_margin}`, and per attack
    `proof.spoof.<modality>.<attack>.{pretrained,random}`) and proof.md / proof.json."""
    from avssl.cluster.tracking import MlflowLogger, open_run, resolve_tracking_uri

    uri = resolve_tracking_uri(recipe.mlflow, recipe.trainer.storage_path)
    run_id = open_run(recipe.mlflow, uri, f"proof-{tag}", recipe.trainer.storage_path)
    logger = MlflowLogger(uri, run_id, recipe.mlflow)
    logger.set_tags({"avssl.pretrained": str(pretrained), "avssl.kind": "proof",
                     "avssl.proof_seeds": ",".join(map(str, seeds))})
    metrics = {}
    for t in table:
        key = f"proof.{t['task'].replace(' (zero-shot)', '_zero_shot')}.{t['mode'].lower()}"
        for field in ("pretrained", "random", "gain", "clear_margin"):
            metrics[f"{key}.{field}"] = float(t[field])
    for a in attacks or []:
        for attack, values in a["eer"].items():
            for init, value in values.items():
                metrics[f"proof.spoof.{a['mode'].lower()}.{attack}.{init}"] = float(value)
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


def paired_gain(pretrained_scores: Path, random_scores: Path, resamples: int = RESAMPLES) -> M.BootstrapResult:
    """The gain of the pretrained backbone over the random one (EER of random minus EER of
    pretrained; UA of pretrained minus UA of random) on the same test samples, with its paired
    speaker-cluster bootstrap (metrics.paired_bootstrap): both score files of one task and mode."""
    p, q = read_scores(pretrained_scores), read_scores(random_scores)
    if sorted(p["key"]) != sorted(q["key"]):
        raise AvsslError(f"{pretrained_scores} and {random_scores} score different samples: re-run `avssl prove` "
                         "so that both backbones are evaluated on the same split and trials")
    order = {k: i for i, k in enumerate(q["key"])}
    align = np.array([order[k] for k in p["key"]])
    speakers = np.array(p["speaker"])
    if "score" in p:
        labels = np.array(p["label"], dtype=int)
        sp, sq = np.array(p["score"], dtype=float), np.array(q["score"], dtype=float)[align]
        stat = lambda i: M.eer(sq[i], labels[i]).eer - M.eer(sp[i], labels[i]).eer  # noqa: E731
    else:
        classes = {c: k for k, c in enumerate(sorted(set(p["label"]) | set(p["prediction"]) | set(q["prediction"])))}
        truth = np.array([classes[c] for c in p["label"]])
        yp = np.array([classes[c] for c in p["prediction"]])
        yq = np.array([classes[c] for c in q["prediction"]])[align]
        stat = lambda i: M.unweighted_accuracy(truth[i], yp[i]) - M.unweighted_accuracy(truth[i], yq[i])  # noqa: E731
    return M.paired_bootstrap(stat, speakers, resamples=resamples)


def comparison(rows: list[dict[str, Any]], resamples: int = RESAMPLES) -> list[dict[str, Any]]:
    """One line per (task, mode): pretrained and random values, the gain (positive = pretrained
    better) and whether it is a clear margin: more than two standard errors of the paired
    speaker-cluster bootstrap of the gain (`paired_gain`), i.e. beyond what re-drawing the test
    speakers moves it by. Also its 95 % bootstrap interval."""
    by = {(r["task"], r["mode"], r["init"]): r for r in rows}
    out = []
    for (task, mode, init) in by:
        if init != "pretrained" or (task, mode, "random") not in by:
            continue
        p, q = by[(task, mode, "pretrained")], by[(task, mode, "random")]
        lower = p["metric"] == "eer"
        gain = (q["value"] - p["value"]) if lower else (p["value"] - q["value"])
        boot = paired_gain(Path(p["scores"]), Path(q["scores"]), resamples)
        margin = 2.0 * boot.standard_error
        out.append({"task": task, "mode": mode.upper(), "metric": "EER %" if lower else "UA %",
                    "pretrained": 100 * p["value"], "random": 100 * q["value"], "gain": 100 * gain,
                    "clear_margin": 100 * margin, "interval": [100 * boot.low, 100 * boot.high],
                    "speakers": boot.clusters, "n": min(p.get("n", 0), q.get("n", 0)),
                    "seed_gains": seed_gains(p, q, lower),
                    "pretrained_better": gain > 0, "clearly_better": gain > margin})
    return out


def attack_table(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Spoof EER % per attack (metrics.per_attack_eer) of each modality's pooled score files:
    [{"mode": "AV", "eer": {attack id: {"pretrained": %, "random": %}}}]. Which attacks the
    pretrained features catch and which neither backbone does, behind each spoof row's one EER."""
    files = {(r["mode"], r["init"]): Path(r["scores"]) for r in rows if r["task"] == "spoof"}
    out = []
    for mode in [m for m, init in files if init == "pretrained" and (m, "random") in files]:
        per_init = {name: attack_eers(files[(mode, name)]) for name in ("pretrained", "random")}
        attacks = sorted(set(per_init["pretrained"]) & set(per_init["random"]))
        out.append({"mode": mode.upper(),
                    "eer": {a: {name: 100 * per_init[name][a] for name in per_init} for a in attacks}})
    return out


def attack_cells(attacks: list[dict[str, Any]] | None) -> tuple[list[str], list[list[str]]]:
    """The per-attack table as text, for proof.md and the CLI: (attack ids, one row per modality:
    [modality, "pretrained / random" per attack, "-" where the modality lacks it])."""
    names = sorted({k for a in attacks or [] for k in a["eer"]})
    rows = [[a["mode"], *(f"{a['eer'][k]['pretrained']:.1f} / {a['eer'][k]['random']:.1f}" if k in a["eer"] else "-"
                          for k in names)] for a in attacks or []]
    return names, rows


def attack_eers(path: Path) -> dict[str, float]:
    """{attack id: EER} of one spoof score file (its group column names each spoof's attack)."""
    f = read_scores(path)
    return M.per_attack_eer(np.array(f["score"], dtype=float), np.array(f["label"], dtype=int), f["group"])


def seed_gains(p: dict[str, Any], q: dict[str, Any], lower: bool) -> list[float]:
    """Each head seed's own gain in points (rows from several seeds, matched by seed), else []."""
    ps, qs = {s["seed"]: s["value"] for s in p.get("seeds", [])}, {s["seed"]: s["value"] for s in q.get("seeds", [])}
    if len(ps) < 2:
        return []
    return [100 * ((qs[s] - ps[s]) if lower else (ps[s] - qs[s])) for s in ps if s in qs]


def seed_gains_text(t: dict[str, Any]) -> str:
    """A table line's per-seed gains as printed: "+3.1 / +2.2 / +4.5", or "-" (zero-shot rows)."""
    return " / ".join(f"{g:+.1f}" for g in t["seed_gains"]) or "-"


def verdict(t: dict[str, Any]) -> str:
    return "yes" if t["clearly_better"] else ("better, within noise" if t["pretrained_better"] else "no")


def markdown(table: list[dict[str, Any]], steps: int, seeds: tuple[int, ...] = (0,),
             attacks: list[dict[str, Any]] | None = None) -> str:
    pooled = len(seeds) > 1
    lines = [f"Pretrained vs random backbone, same head, data and {steps} finetuning steps (lower EER, higher UA is better;",
             "gain in points, positive = pretrained better; clear = gain beyond two standard errors of a paired",
             "bootstrap over the test speakers)."]
    if pooled:
        lines += [f"Finetuned heads: one per seed ({', '.join(map(str, seeds))}); each clip's scores are averaged over the",
                  "seeds before the verdict. 'per seed' lists each seed's own gain (zero-shot rows have no head)."]
    head = "| task | modality | metric | pretrained | random | gain | clear margin |" + (" per seed |" if pooled else "")
    lines += ["", head, "| --- " * (head.count("|") - 1) + "|"]
    for t in table:
        line = (f"| {t['task']} | {t['mode']} | {t['metric']} | {t['pretrained']:.1f} | {t['random']:.1f} | "
                f"{t['gain']:+.1f} (±{t['clear_margin']:.1f}) | {verdict(t)} |")
        if pooled:
            line += f" {seed_gains_text(t)} |"
        lines.append(line)
    names, cells = attack_cells(attacks)
    if names:
        lines += ["", "Spoof EER % per attack (each attack's spoofs against all bona fide clips), pretrained / random:",
                  "", "| modality | " + " | ".join(names) + " |", "| --- " * (len(names) + 1) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines) + "\n"
