"""Building a corpus directory: the synthetic corpus, normalization statistics, inspection."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from pydantic import Field

from avssl import AvsslError
from avssl.config import Section, save_resolved
from avssl.data.features import FeatureConfig, RunningMoments, fbank, load_stats, save_stats
from avssl.data.stats import compute_stats, stats_from_moments  # noqa: F401  (re-exported for the CLI)
from avssl.data.schema import Clip
from avssl.data.shards import (
    CorpusIndex,
    CorpusWriter,
    ReadReport,
    ShardConfig,
    decode_clip,
    iter_checked_samples,
    iter_raw_samples,
)
from avssl.data.synth import SynthConfig, format_trials, generate, num_clips, trials
from avssl.io import atomic_write_text
from avssl.progress import progress_bar

TRIALS_DIR = "trials"


class CorpusRecipe(Section):
    """`configs/data/*.yaml`: how to generate the synthetic corpus and shard it."""

    synth: SynthConfig = Field(default_factory=SynthConfig)
    shards: ShardConfig = Field(default_factory=ShardConfig)
    features: FeatureConfig = Field(default_factory=FeatureConfig)


def synthesize_corpus(recipe: CorpusRecipe, out: Path) -> CorpusIndex:
    """Generate the synthetic corpus into shards, with stats.json, trials and the resolved recipe."""
    import torch

    out = Path(out)
    if (out / "index.json").exists():
        raise AvsslError(f"{out}: a corpus already exists here; remove it or choose another --out")
    total = num_clips(recipe.synth)
    per_split: Counter[str] = Counter()
    moments, stat_clips = RunningMoments(), 0
    with CorpusWriter(out, recipe.shards, dataset="synth") as writer, progress_bar("synthesizing", total) as bar:
        for clip in generate(recipe.synth):
            writer.write(clip)
            per_split[clip.meta.split] += 1
            if clip.meta.split == "train" and clip.audio is not None:
                moments.update(fbank(torch.from_numpy(clip.audio), recipe.features))
                stat_clips += 1
            bar.advance()
        writer.close(extra={"generator": "avssl.data.synth", "seed": recipe.synth.seed})
    save_stats(out, stats_from_moments(moments, recipe.features, stat_clips))
    atomic_write_text(out / TRIALS_DIR / "synth_test.txt", format_trials(trials(recipe.synth)))
    save_resolved(recipe, out / "recipe.yaml")
    return CorpusIndex.load(out)


def summarize(corpus: Path) -> dict[str, Any]:
    """Counts per split: samples, shards, bytes, speakers, emotions, spoof/attacks, modalities.
    Damage does not stop it: unreadable shards and samples whose metadata does not parse are
    counted and named in `problems` ("bad_shards", "bad_samples"), and `read` says how many
    samples of a split could be read (against the index's `samples`)."""
    import json

    index = CorpusIndex.load(corpus)
    out: dict[str, Any] = {"dataset": index.data["dataset"], "splits": {}}
    report = ReadReport()
    for split in index.splits:
        speakers: set[str] = set()
        emotions: Counter[str] = Counter()
        attacks: Counter[str] = Counter()
        modalities: Counter[str] = Counter()
        duration, read = 0.0, 0
        for sample in iter_checked_samples(index.shards(split), report):
            try:
                meta = json.loads(sample["json"])
                speaker, spoof, seconds = meta["speaker"], meta["spoof"], float(meta["duration"])
                attack = meta["attack"] if spoof == "spoof" else "bonafide"
            except Exception as exc:  # missing or broken metadata: this sample's fault
                report.sample(sample, exc)
                continue
            read += 1
            speakers.add(speaker)
            emotions[meta.get("emotion") or "-"] += 1
            attacks[attack] += 1
            modalities["+".join(m for m, k in (("audio", "flac"), ("video", "mp4")) if k in sample)] += 1
            duration += seconds
        shards = index.data["splits"][split]["shards"]
        out["splits"][split] = {
            "samples": index.count(split),
            "read": read,
            "shards": len(shards),
            "bytes": sum(s["bytes"] for s in shards),
            "speakers": len(speakers),
            "hours": duration / 3600,
            "emotions": dict(sorted(emotions.items())),
            "spoof": dict(sorted(attacks.items())),
            "modalities": dict(modalities),
        }
    try:
        out["stats"] = load_stats(corpus).model_dump()
    except AvsslError:
        out["stats"] = None
    out["trials"] = sorted(str(p.relative_to(corpus)) for p in (Path(corpus) / TRIALS_DIR).glob("*.txt"))
    out["problems"] = {"bad_shards": report.bad_shards, "bad_samples": report.bad_samples}
    return out


def first_clip(corpus: Path, split: str = "train", report: ReadReport | None = None) -> Clip:
    """The split's first sample that decodes; the ones before it that do not go into `report`."""
    index = CorpusIndex.load(corpus)
    report = ReadReport() if report is None else report
    for sample in iter_checked_samples(index.shards(split), report):
        try:
            return decode_clip(sample)
        except Exception as exc:
            report.sample(sample, exc)
    if report:
        raise AvsslError(f"{corpus}: no readable sample in split {split!r} ({report.describe(3)})")
    raise AvsslError(f"{corpus}: split {split!r} is empty")


def extract_clips(corpus: Path, out: Path, split: str = "test", speakers: int = 2, per_speaker: int = 2) -> list[Path]:
    """Write bona fide clips of a corpus back to media files (`SPEAKER_UTTERANCE.flac`, and `.mp4`
    where the clip has video): `per_speaker` clips of each of the first `speakers` speakers of
    `split`, in shard order. For trying `avssl embed`, `verify` and `predict` on files."""
    import json

    index = CorpusIndex.load(corpus)
    chosen: dict[str, int] = {}
    written: list[Path] = []
    out.mkdir(parents=True, exist_ok=True)
    for sample in iter_raw_samples(index.shards(split)):
        meta = json.loads(sample["json"])
        speaker = meta["speaker"]
        if meta.get("spoof") != "bonafide" or "flac" not in sample:
            continue
        if speaker not in chosen and len(chosen) == speakers or chosen.get(speaker, 0) == per_speaker:
            continue
        chosen[speaker] = chosen.get(speaker, 0) + 1
        name = meta["utterance"] if meta["utterance"].startswith(speaker) else f"{speaker}_{meta['utterance']}"
        stem = out / name.replace("/", "_")
        for ext in ("flac", "mp4"):
            if ext in sample:
                path = stem.with_suffix(f".{ext}")
                path.write_bytes(sample[ext])
                written.append(path)
        if len(chosen) == speakers and all(n == per_speaker for n in chosen.values()):
            break
    if not written:
        raise AvsslError(f"{corpus}: split {split!r} has no bona fide clip with audio to extract")
    return written


def face_sheet(corpus: Path, split: str, path: Path, count: int = 24) -> Path | None:
    """A contact sheet of the first frame of up to `count` video samples of a split, titled with
    the speaker and how the crop was made (face, passthrough, whole frame); None without video."""
    import json

    from avssl.data.faces import contact_sheet
    from avssl.data.schema import decode_video
    from avssl.data.shards import ReadReport, iter_checked_samples

    crops = []
    for sample in iter_checked_samples(CorpusIndex.load(corpus).shards(split), ReadReport()):
        if "mp4" not in sample:
            continue
        try:
            frames, _ = decode_video(sample["mp4"], keep=lambda n, fps: [0])
            meta = json.loads(sample["json"])
        except Exception:  # damaged samples are reported by the summary
            continue
        crop = (meta.get("extra", {}).get("face") or {}).get("crop", "whole frame")
        crops.append((f"{meta['speaker']} ({crop})", frames[0]))
        if len(crops) == count:
            break
    return contact_sheet(crops, path) if crops else None


def plot_clip(clip: Clip, features: FeatureConfig, path: Path) -> Path:
    """A picture of one sample: waveform, log-mel filterbank and a strip of face frames."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import torch

    fig, axes = plt.subplots(3, 1, figsize=(10, 8), gridspec_kw={"height_ratios": [1, 2, 1.4]})
    m = clip.meta
    fig.suptitle(f"{m.utterance}  speaker={m.speaker}  emotion={m.emotion}  {m.spoof} {m.attack}")
    if clip.audio is not None:
        t = np.arange(len(clip.audio)) / 16000
        axes[0].plot(t, clip.audio, lw=0.5)
        axes[0].set_xlim(0, t[-1])
        axes[0].set_ylabel("wave")
        axes[1].imshow(fbank(torch.from_numpy(clip.audio), features).T.numpy(), origin="lower", aspect="auto")
        axes[1].set_ylabel("mel bin")
        axes[1].set_xlabel("frame (10 ms)")
    if clip.video is not None:
        idx = np.linspace(0, len(clip.video) - 1, 8).round().astype(int)
        axes[2].imshow(np.concatenate(list(clip.video[idx]), axis=1))
        axes[2].set_title(f"frames {idx.tolist()} at {m.fps:g} fps")
    axes[2].axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
