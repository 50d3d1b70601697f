"""`avssl data prepare DATASET --root RAW_DIR --out SHARD_DIR`: real datasets -> avssl shards.

Each preparer reads one dataset in its original on-disk layout (listed below), turns every
utterance into a `Clip` of the one sample schema (`avssl.data.schema`: 16 kHz mono audio, RGB
frames at their own frame rate, `Meta` labels) and writes shards with `CorpusWriter`. Beside the
shards it writes the evaluation lists, `stats.json` and `prepare.json` (this run's summary).
`stats.json` holds the fbank statistics `avssl.data.stats.compute_stats` would compute from the
"train" split (the first split for test-only corpora), accumulated while each clip's audio is in
memory: reading the shards back would decode every video a second time.

Datasets (layout under --root -> splits; details in each preparer's docstring):

- `voxceleb1`: `wav/<spk>/<yt>/<NNNNN>.wav`, trial lists beside `wav/` -> the Vox1-O test
  speakers id10270-id10309 "test", the others "train".
- `voxceleb2`: `dev/aac/<spk>/<yt>/<NNNNN>.m4a` + `dev/mp4/<spk>/<yt>/<NNNNN>.mp4` -> "train".
- `cremad`: `AudioWAV/<actor>_<sentence>_<emotion>_<level>.wav` + `VideoFlash/<same>.flv` ->
  actor fold 4 "test", folds 0-3 "train".
- `ravdess`: `Actor_XX/MM-VV-EE-II-SS-RR-AA.(wav|mp4)`, Actor_XX up to two folders down ->
  actors 21-24 "test", the rest "train".
- `asvspoof2019_la`: `ASVspoof2019_LA_{train,dev,eval}/flac/*.flac` + `ASVspoof2019_LA_cm_protocols/`
  -> "train" / "val" / "test".
- `asvspoof2021_la`, `asvspoof2021_df`: `ASVspoof2021_{LA,DF}_eval/flac/*.flac` (DF also in
  `ASVspoof2021_DF_eval_partNN/ASVspoof2021_DF_eval/flac/`) + `keys/{LA,DF}/CM/trial_metadata.txt`
  -> "test".
- `in_the_wild`: `[release_in_the_wild/]<n>.wav` + `meta.csv` (`file,speaker,label`) -> "test".

Utterance ids are the file's path without its extension, relative to the media folder
(`id10270/x6uYqmx31kE/00001`, `1001_DFA_ANG_XX`, `LA_T_1271820`): VoxCeleb trial entries map to
them by dropping ".wav". Evaluation lists:

- `trials/vox1_O.txt`, `vox1_E.txt`, `vox1_H.txt`: copies of `veri_test2.txt`, `list_test_all2.txt`,
  `list_test_hard2.txt`, line for line (`<1|0> <enroll> <test>`). E and H use all 1,251 Vox1
  speakers, the "train" split included: a model scored on them must not train on VoxCeleb1.
- `protocols/cm_<split>.txt` for spoof corpora, one line per written sample in the ASVspoof 2019
  CM format `SPEAKER UTTERANCE - ATTACK KEY` (spaces in In-the-Wild speaker names become `_`);
  for ASVspoof 2021 also `cm_test_eval.txt`, the rows whose subset is `eval` (published numbers
  use only those). The original protocol / key files and ASV score files are copied unchanged.

Failure policy: a missing root, or a root without the dataset's landmark folder, raises
AvsslError naming what is missing; so does a protocol line that does not parse (file:line and the
expected format). A file listed but missing, or media that does not decode, is recorded in
`PrepareSummary.unreadable` as (path, reason) and skipped, never fatal; when only the video of an
audio-visual clip fails, the clip is kept audio-only (and the video is still reported).

Resume: a complete corpus (`<out>/index.json` exists; it is written after every shard and list,
only stats.json comes later and is recomputed when missing) is reported and nothing is redone.
An interrupted run resumes: every `checkpoint_items` utterances (and at least every
`checkpoint_seconds`) the open shards are finished and `<out>/.prepare-progress.json` records,
atomically, how far the run got: the finished shards, counts, fbank moments and problems. The
next run with the same inputs (checked by a fingerprint of the utterance list) keeps those
shards, deletes any other shard file (half-written ones are only ever temporary names) and
goes on from there; since checkpoints fall on fixed utterance counts, the resumed corpus is
byte-identical to an uninterrupted one. A run with other inputs starts from scratch.

Utterances are decoded, face-cropped and encoded in `workers` processes (default: every core)
or as Ray tasks (`address`), and written in their order, so the corpus does not depend on how
the work was spread. Measured throughput and what VoxCeleb2 would take: docs/data.md.
"""

from __future__ import annotations

import abc

import csv
import logging
import os
import re
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from avssl import AvsslError
from avssl.data.faces import FaceConfig
from avssl.data.features import STATS_FILE, FeatureConfig, RunningMoments, fbank, save_stats
from avssl.data.media import AUDIO_EXTENSIONS, SUPPORTED, VIDEO_EXTENSIONS, media_kind, read_audio, read_video
from avssl.data.schema import EMOTIONS, SAMPLE_RATE, SPLITS, Clip, Meta, utterance_to_key
from avssl.data.shards import INDEX_FILE, CorpusIndex, CorpusWriter, ShardConfig, encode_clip
from avssl.io import atomic_write_text, read_json, write_json
from avssl.progress import progress_bar

log = logging.getLogger(__name__)

TRIALS_DIR = "trials"
PROTOCOLS_DIR = "protocols"
SUMMARY_FILE = "prepare.json"


# ----------------------------------------------------------------------------- items and summary


@dataclass
class Item:
    """One utterance to convert: where its media are and its labels (duration comes from decoding).

    `audio` may be a .wav/.flac (soundfile) or any container PyAV reads (.m4a, an .mp4's audio
    track); `video` any container with a video stream (.mp4, .flv).
    """

    utterance: str
    speaker: str
    split: str
    audio: Path | None = None
    video: Path | None = None
    emotion: str | None = None
    spoof: str = "bonafide"
    attack: str = "-"
    extra: dict[str, Any] = field(default_factory=dict)
    audio_optional: bool = False  # audio from a video container: a container without sound gives a video-only sample


@dataclass
class PrepareSummary:
    """What a `prepare_dataset` run did: samples per split, files skipped and why, lists written."""

    dataset: str
    out: Path
    counts: dict[str, int]
    unreadable: list[tuple[str, str]]
    elapsed: float
    resumed: bool = False
    files: list[str] = field(default_factory=list)  # trial / protocol files, relative to out
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "out": str(self.out),
            "counts": dict(self.counts),
            "unreadable": [list(u) for u in self.unreadable],
            "elapsed": self.elapsed,
            "resumed": self.resumed,
            "files": list(self.files),
            "notes": list(self.notes),
        }

    def describe(self, max_unreadable: int = 20) -> str:
        """Plain-text report for the CLI: counts, lists written, notes, the first unreadable files."""
        state = "already prepared" if self.resumed else f"prepared in {self.elapsed:.1f} s"
        counts = ", ".join(f"{split} {n}" for split, n in self.counts.items())
        lines = [f"{self.dataset} -> {self.out} ({state}): {counts}"]
        lines += [f"  wrote {f}" for f in self.files]
        lines += [f"  note: {n}" for n in self.notes]
        if self.unreadable:
            lines.append(f"  {len(self.unreadable)} files skipped or degraded (all listed in {self.out / SUMMARY_FILE}):")
            lines += [f"    {path}: {reason}" for path, reason in self.unreadable[:max_unreadable]]
            if len(self.unreadable) > max_unreadable:
                lines.append(f"    ... and {len(self.unreadable) - max_unreadable} more")
        return "\n".join(lines)


class Scan:
    """What a preparer found before decoding anything: items, problems, notes."""

    def __init__(self) -> None:
        self.items: list[Item] = []
        self.unreadable: list[tuple[str, str]] = []
        self.notes: list[str] = []

    def bad(self, path: Path | str, reason: str) -> None:
        self.unreadable.append((str(path), reason))


# ----------------------------------------------------------------------------- media


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def load_clip(item: Item, dataset: str, problems: list[tuple[str, str]], faces: FaceConfig | None = None) -> Clip | None:
    """Decode an item's media into a Clip; None (with the problem recorded) when unusable.

    With `faces`, video frames become face crops (`avssl.data.faces`) and `extra["face"]` records
    how; a video where no face is found keeps only its audio, and is recorded as degraded."""
    audio = video = None
    fps = None
    extra = dict(item.extra)
    if item.audio is not None:
        if not item.audio.is_file():
            problems.append((str(item.audio), "missing: listed but not on disk"))
            return None
        try:
            audio = read_audio(item.audio)
        except Exception as exc:  # corrupt media is skipped, never fatal
            if not (item.audio_optional and "no audio" in str(exc)):
                problems.append((str(item.audio), f"unreadable audio ({_reason(exc)})"))
                return None
    if item.video is not None:
        try:
            video, fps, face = read_video(item.video, faces)
            if face is not None:
                extra["face"] = face
            if video is None:
                kept = "kept audio only" if audio is not None else "skipped"
                problems.append((str(item.video), f"no face in {100 * (1 - face['detected']):.0f} % of probed frames: {kept}"))
        except Exception as exc:
            kept = "; kept audio only" if audio is not None else ""
            problems.append((str(item.video), f"unreadable video ({_reason(exc)}){kept}"))
    if audio is None and video is None:
        return None
    duration = len(audio) / SAMPLE_RATE if audio is not None else len(video) / fps
    meta = Meta(
        dataset=dataset,
        speaker=item.speaker,
        utterance=item.utterance,
        duration=float(duration),
        emotion=item.emotion,
        spoof=item.spoof,
        attack=item.attack,
        fps=float(fps) if video is not None else None,
        split=item.split,
        extra=extra,
    )
    return Clip(meta=meta, audio=audio, video=video)


# ----------------------------------------------------------------------------- helpers


def _files(folder: Path, suffixes: tuple[str, ...], scan: "Scan | None" = None) -> list[Path]:
    """Every file under `folder` with one of `suffixes` (any letter case), sorted; os.walk is fast
    on big trees. With `scan`, every other file (hidden ones aside) is recorded as skipped, so
    nothing is left out without being counted and named."""
    out: list[Path] = []
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):  # linked folders are the user's too
        real = os.path.realpath(dirpath)
        if real in seen:  # a link back up the tree: walk each folder once
            dirnames.clear()
            continue
        seen.add(real)
        dirnames.sort()
        for f in filenames:
            if f.startswith("."):
                continue
            if f.lower().endswith(suffixes):
                out.append(Path(dirpath) / f)
            elif scan is not None:
                scan.bad(Path(dirpath) / f, f"skipped: not a {'/'.join(s[1:] for s in suffixes)} file")
    return sorted(out)


def _need_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise AvsslError(f"{path.parent}: no {path.name}/ folder; expected {what}")
    return path


def _protocol_error(path: Path, lineno: int, expected: str, line: str) -> AvsslError:
    return AvsslError(f"{path}:{lineno}: expected {expected}, got {line.rstrip()!r}")


def _read_lines(path: Path) -> Iterable[tuple[int, str]]:
    """(line number, stripped line) of the non-blank lines of a text protocol."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                yield lineno, line.strip()


def _cm_line(item: Item) -> str:
    """ASVspoof 2019 CM protocol line `SPEAKER UTTERANCE - ATTACK KEY` for a written sample."""
    return f"{item.speaker.replace(' ', '_')} {item.utterance} - {item.attack} {item.spoof}\n"


def _write_cm_protocols(
    out: Path, written: list[Item], extra_files: dict[str, Callable[[Item], bool]] | None = None
) -> list[str]:
    files = []
    for split in SPLITS:
        rows = [i for i in written if i.split == split]
        if rows:
            name = f"{PROTOCOLS_DIR}/cm_{split}.txt"
            atomic_write_text(out / name, "".join(_cm_line(i) for i in rows))
            files.append(name)
    for name, keep in (extra_files or {}).items():
        atomic_write_text(out / PROTOCOLS_DIR / name, "".join(_cm_line(i) for i in written if keep(i)))
        files.append(f"{PROTOCOLS_DIR}/{name}")
    return files


def _copy(src: Path, out: Path, name: str) -> str:
    dst = out / name
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
    return name


# ----------------------------------------------------------------------------- preparers


class Preparer(abc.ABC):
    """One dataset: `scan` lists its utterances (parsing names and protocols, failing fast on a bad
    protocol line) and `write_lists` writes its trial / protocol files for the written samples."""

    name: str = ""
    layout: str = ""
    faces_default: str = "auto"  # face cropping of this dataset's videos when --faces is not given

    @abc.abstractmethod
    def scan(self, root: Path, video: bool) -> Scan:
        """Every utterance of the dataset under `root`, with labels parsed from names and protocols."""

    def write_lists(self, root: Path, out: Path, written: list[Item]) -> list[str]:
        return []


class VoxCeleb1(Preparer):
    """VoxCeleb1 audio (.wav as released, or .flac). Split: the 40 Vox1-O test speakers (id10270-id10309, exactly the speakers of
    veri_test2.txt) -> "test", the other 1,211 -> "train"; Vox1-E/H trials use all speakers."""

    name = "voxceleb1"
    layout = "VoxCeleb1's wav/<speaker>/<youtube_id>/<NNNNN>.wav (vox1_dev_wav.zip + vox1_test_wav.zip)"
    TRIAL_LISTS = {"veri_test2.txt": "vox1_O.txt", "list_test_all2.txt": "vox1_E.txt", "list_test_hard2.txt": "vox1_H.txt"}
    TEST_SPEAKERS = range(10270, 10310)

    def scan(self, root: Path, video: bool) -> Scan:
        wav = _need_dir(root / "wav", self.layout)
        scan = Scan()
        for src in self.TRIAL_LISTS:  # validate before hours of decoding
            if (root / src).is_file():
                _check_trials(root / src)
        for path in _files(wav, (".wav", ".flac"), scan):
            parts = path.relative_to(wav).parts
            if len(parts) != 3:
                scan.bad(path, "not at wav/<speaker>/<youtube_id>/<NNNNN>.wav (or .flac)")
                continue
            spk, yt, _ = parts
            m = re.fullmatch(r"id(\d{5})", spk)
            split = "test" if m and int(m.group(1)) in self.TEST_SPEAKERS else "train"
            scan.items.append(Item(f"{spk}/{yt}/{path.stem}", spk, split, audio=path, extra={"youtube_id": yt}))
        if not any((root / s).is_file() for s in self.TRIAL_LISTS):
            scan.notes.append(f"no trial lists ({', '.join(self.TRIAL_LISTS)}) in {root}: none copied")
        return scan

    def write_lists(self, root: Path, out: Path, written: list[Item]) -> list[str]:
        return [_copy(root / src, out, f"{TRIALS_DIR}/{dst}") for src, dst in self.TRIAL_LISTS.items() if (root / src).is_file()]


def _check_trials(path: Path) -> None:
    for lineno, line in _read_lines(path):
        fields = line.split()
        if len(fields) != 3 or fields[0] not in ("0", "1"):
            example = "1 id10270/x6uYqmx31kE/00001.wav id10270/8jEAjG6SegY/00008.wav"
            raise _protocol_error(path, lineno, f"'<1|0> <enroll> <test>' (e.g. '{example}')", line)


class VoxCeleb2(Preparer):
    """VoxCeleb2 dev: the .m4a (AAC, decoded by PyAV; any supported audio format is read) and the
    face-cropped .mp4 (any supported video format) of an utterance form one sample; a missing
    video gives an audio-only sample, a missing audio file takes the video's own sound track (a
    video-only sample when it has none). The videos are face crops already: read with faces "off"
    unless asked otherwise. All "train" (the VoxCeleb2 test set, if present under test/, is not read)."""

    name = "voxceleb2"
    layout = "VoxCeleb2's dev/aac/<speaker>/<youtube_id>/<NNNNN>.m4a (and dev/mp4/... .mp4)"
    faces_default = "off"

    def scan(self, root: Path, video: bool) -> Scan:
        dev = _need_dir(root / "dev", self.layout)
        if not (dev / "aac").is_dir() and not (video and (dev / "mp4").is_dir()):
            raise AvsslError(f"{dev}: no aac/ folder; expected {self.layout}")
        scan = Scan()
        media: dict[str, dict[str, Path]] = {}
        kinds = [("aac", AUDIO_EXTENSIONS, "audio")] + ([("mp4", VIDEO_EXTENSIONS, "video")] if video else [])
        for folder, suffixes, kind in kinds:
            if not (dev / folder).is_dir():
                scan.notes.append(f"no {dev / folder}: {'audio' if kind == 'video' else 'video'}-only samples")
                continue
            for path in _files(dev / folder, suffixes, scan):
                parts = path.relative_to(dev / folder).parts
                if len(parts) != 3:
                    scan.bad(path, f"not at dev/{folder}/<speaker>/<youtube_id>/<NNNNN>.<ext>")
                    continue
                utt = f"{parts[0]}/{parts[1]}/{path.stem}"
                if kind in media.get(utt, {}):
                    scan.bad(path, f"duplicate of {media[utt][kind]}")
                    continue
                media.setdefault(utt, {})[kind] = path
        for utt, m in sorted(media.items()):
            spk, yt, _ = utt.split("/")
            # Without an audio file the video's own sound track (if it has one) is the audio.
            audio, optional = (m["audio"], False) if "audio" in m else (m.get("video"), True)
            scan.items.append(Item(utt, spk, "train", audio=audio, video=m.get("video"), extra={"youtube_id": yt},
                                   audio_optional=optional))
        return scan


class CremaD(Preparer):
    """CREMA-D: emotion from the file name; 5 actor-disjoint folds, fold = (actor - 1001) % 5 (the
    index in the sorted list of actors 1001-1091, mod 5); fold 4 -> "test", folds 0-3 "train".
    `extra` = {sentence, level, fold}. The four known-broken videos are left out (audio kept)."""

    name = "cremad"
    layout = "CREMA-D's AudioWAV/<actor>_<sentence>_<emotion>_<level>.wav (and VideoFlash/<same>.flv)"
    BROKEN_VIDEOS = frozenset({"1076_MTI_NEU_XX", "1076_MTI_SAD_XX", "1064_TIE_SAD_XX", "1064_IEO_DIS_MD"})
    TEST_FOLD = 4
    NAME = re.compile(r"(\d{4})_([A-Z]{3})_([A-Z]{3})_([A-Z]{1,2})")

    def scan(self, root: Path, video: bool) -> Scan:
        audio_dir = _need_dir(root / "AudioWAV", self.layout)
        video_dir = root / "VideoFlash"
        scan = Scan()
        if video and not video_dir.is_dir():
            scan.notes.append(f"no {video_dir}: audio-only samples")
            video = False
        no_video = 0
        for path in _files(audio_dir, (".wav",), scan):
            m = self.NAME.fullmatch(path.stem)
            if not m or m.group(3) not in EMOTIONS:
                scan.bad(path, f"name is not <actor>_<sentence>_<emotion>_<level> with emotion in {'/'.join(EMOTIONS)}")
                continue
            actor, sentence, emotion, level = m.groups()
            fold = (int(actor) - 1001) % 5
            flv = video_dir / f"{path.stem}.flv"
            use_video = video and path.stem not in self.BROKEN_VIDEOS and flv.is_file()
            no_video += video and not use_video and path.stem not in self.BROKEN_VIDEOS
            scan.items.append(
                Item(
                    path.stem, actor, "test" if fold == self.TEST_FOLD else "train",
                    audio=path, video=flv if use_video else None, emotion=emotion,
                    extra={"sentence": sentence, "level": level, "fold": fold},
                )
            )
        if video:
            scan.notes.append(f"known-broken videos left out (audio kept): {', '.join(sorted(self.BROKEN_VIDEOS))}")
        if no_video:
            scan.notes.append(f"{no_video} clips have no VideoFlash/*.flv: audio only")
        return scan


RAVDESS_EMOTIONS = ("neutral", "calm", "happy", "sad", "angry", "fearful", "disgust", "surprised")  # codes 01-08
RAVDESS_TO_CREMAD = {"neutral": "NEU", "happy": "HAP", "sad": "SAD", "angry": "ANG", "fearful": "FEA", "disgust": "DIS"}


class Ravdess(Preparer):
    """RAVDESS: every file is one sample, labels from its code MM-VV-EE-II-SS-RR-AA. Modality 01
    (.mp4 with audio) gives audio and frames from the same file, 02 (.mp4) frames only, 03 (.wav)
    audio only; the same performance thus appears up to three times, linked by `extra.recording`
    (the code without MM). The 8-class emotion is `extra.emotion8`; `emotion` is its CREMA-D name
    (calm and surprised -> None). Audio is 48 kHz, resampled to 16 kHz. Frames are the
    1280x720 recording, cropped to the face (`--faces`). Folds of 4 actors, fold = (actor - 1) // 4 (the usual
    6-fold subject-independent protocol); fold 5 = actors 21-24 -> "test", the rest "train"."""

    name = "ravdess"
    layout = "RAVDESS's Actor_XX/MM-VV-EE-II-SS-RR-AA.(wav|mp4) folders"
    CODE = re.compile(r"(0[1-3])-(0[12])-(0[1-8])-(0[12])-(0[12])-(0[12])-(\d\d)")
    MODALITY = {"01": "audio-video", "02": "video-only", "03": "audio-only"}
    TEST_FOLD = 5

    def scan(self, root: Path, video: bool) -> Scan:
        actor_dirs = sorted({d for pattern in ("Actor_*", "*/Actor_*", "*/*/Actor_*") for d in root.glob(pattern) if d.is_dir()})
        if not actor_dirs:
            raise AvsslError(f"{root}: no Actor_XX/ folders; expected {self.layout}")
        scan = Scan()
        seen: dict[str, Path] = {}
        skipped_video_only = 0
        for folder in actor_dirs:
            for path in _files(folder, (".wav", ".mp4"), scan):
                m = self.CODE.fullmatch(path.stem)
                if not m:
                    scan.bad(path, "name is not a RAVDESS code MM-VV-EE-II-SS-RR-AA")
                    continue
                modality, channel, emo, intensity, statement, repetition, actor = m.groups()
                if (path.suffix.lower() == ".wav") != (modality == "03"):
                    scan.bad(path, f"modality {modality} ({self.MODALITY[modality]}) does not match a {path.suffix} file")
                    continue
                if path.stem in seen:
                    scan.bad(path, f"duplicate of {seen[path.stem]}")
                    continue
                seen[path.stem] = path
                if modality == "02" and not video:
                    skipped_video_only += 1
                    continue
                emotion8 = RAVDESS_EMOTIONS[int(emo) - 1]
                fold = (int(actor) - 1) // 4
                scan.items.append(
                    Item(
                        path.stem, f"Actor_{actor}", "test" if fold == self.TEST_FOLD else "train",
                        audio=path if modality in ("01", "03") else None,
                        video=path if modality in ("01", "02") and video else None,
                        emotion=RAVDESS_TO_CREMAD.get(emotion8),
                        extra={
                            "modality": self.MODALITY[modality], "vocal_channel": "speech" if channel == "01" else "song",
                            "emotion8": emotion8, "intensity": "normal" if intensity == "01" else "strong",
                            "statement": int(statement), "repetition": int(repetition), "actor": int(actor),
                            "sex": "male" if int(actor) % 2 else "female", "fold": fold, "recording": path.stem[3:],
                        },
                    )
                )
        if skipped_video_only:
            scan.notes.append(f"video=False: {skipped_video_only} video-only (modality 02) files left out")
        return scan


def _asvspoof_entry(speaker: str, utt: str, key: str, attack: str, split: str, audio: Path, extra: dict[str, Any]) -> Item:
    return Item(utt, speaker, split, audio=audio, spoof=key, attack="-" if key == "bonafide" else attack, extra=extra)


class ASVspoof2019LA(Preparer):
    """ASVspoof 2019 LA: CM protocols give speaker, attack (A01-A19, "-" for bona fide) and key;
    train / dev / eval -> "train" / "val" / "test". ASV score files are copied for t-DCF."""

    name = "asvspoof2019_la"
    layout = "ASVspoof 2019 LA's ASVspoof2019_LA_cm_protocols/ and ASVspoof2019_LA_{train,dev,eval}/flac/"
    PROTOCOLS = "ASVspoof2019_LA_cm_protocols"
    SPLITS = (("train", "train.trn", "train"), ("dev", "dev.trl", "val"), ("eval", "eval.trl", "test"))
    EXPECTED = "'SPEAKER FILE - SYSTEM KEY' (e.g. 'LA_0079 LA_T_1271820 - A01 spoof' or 'LA_0079 LA_T_1138215 - - bonafide')"
    ASV_SCORES = ("ASVspoof2019.LA.asv.dev.gi.trl.scores.txt", "ASVspoof2019.LA.asv.eval.gi.trl.scores.txt")

    def _protocol(self, root: Path, part: str) -> Path:
        return root / self.PROTOCOLS / f"ASVspoof2019.LA.cm.{part}.txt"

    def scan(self, root: Path, video: bool) -> Scan:
        _need_dir(root / self.PROTOCOLS, self.layout)
        scan = Scan()
        found = False
        for folder, part, split in self.SPLITS:
            protocol = self._protocol(root, part)
            flac = root / f"ASVspoof2019_LA_{folder}" / "flac"
            if not protocol.is_file():
                scan.notes.append(f"no {protocol}: split {split!r} left out")
                continue
            rows = list(self._parse(protocol))  # parse errors are fatal even when the audio is absent
            if not flac.is_dir():
                scan.notes.append(f"no {flac}: split {split!r} ({len(rows)} protocol rows) left out")
                continue
            found = True
            for speaker, utt, system, key in rows:
                scan.items.append(_asvspoof_entry(speaker, utt, key, system, split, flac / f"{utt}.flac", {}))
        if not found:
            raise AvsslError(f"{root}: no split with both a CM protocol and a flac/ folder; expected {self.layout}")
        return scan

    def _parse(self, path: Path) -> Iterable[tuple[str, str, str, str]]:
        for lineno, line in _read_lines(path):
            f = line.split()
            if len(f) != 5 or f[4] not in ("bonafide", "spoof") or (f[4] == "spoof") == (f[3] == "-"):
                raise _protocol_error(path, lineno, self.EXPECTED, line)
            yield f[0], f[1], f[3], f[4]

    def write_lists(self, root: Path, out: Path, written: list[Item]) -> list[str]:
        files = _write_cm_protocols(out, written)
        for _, part, _ in self.SPLITS:
            if self._protocol(root, part).is_file():
                files.append(_copy(self._protocol(root, part), out, f"{PROTOCOLS_DIR}/{self._protocol(root, part).name}"))
        for name in self.ASV_SCORES:
            src = root / "ASVspoof2019_LA_asv_scores" / name
            if src.is_file():
                files.append(_copy(src, out, f"{PROTOCOLS_DIR}/{name}"))
        return files


class ASVspoof2021(Preparer):
    """ASVspoof 2021 LA or DF evaluation data, all "test". The key's label is the column just
    before the trim flag (trim / notrim) and the subset the one just after, the attack two before:
    this holds for LA (`spk trial codec trans attack label trim subset`) and DF (`spk trial codec
    source attack label trim subset vocoder - - - -`), whose bona fide rows may carry "bonafide"
    in the attack and vocoder columns too. A spoof row without an attack id ("-") gets attack
    "unknown" (counted in the notes). Every row is kept, with `extra.subset` (eval /
    progress / hidden): published numbers use only subset == eval (protocols/cm_test_eval.txt)."""

    SUBSETS = ("eval", "progress", "hidden")

    def __init__(self, track: str) -> None:
        self.track = track
        self.name = f"asvspoof2021_{track.lower()}"
        self.layout = (
            f"ASVspoof 2021 {track}'s ASVspoof2021_{track}_eval/flac/{track}_E_*.flac and keys/{track}/CM/trial_metadata.txt"
            f" ({track}-keys-full.tar.gz)"
        )
        extra = "codec trans attack label trim subset" if track == "LA" else "codec source attack label trim subset vocoder ..."
        self.expected = f"'SPEAKER TRIAL {extra}' with label bonafide/spoof, trim notrim/trim and subset eval/progress/hidden"

    def _key(self, root: Path) -> Path:
        return root / "keys" / self.track / "CM" / "trial_metadata.txt"

    def _flac_dirs(self, root: Path) -> list[Path]:
        t = self.track
        dirs = [root / f"ASVspoof2021_{t}_eval" / "flac"]
        dirs += sorted(root.glob(f"ASVspoof2021_{t}_eval_part*/ASVspoof2021_{t}_eval/flac"))  # DF ships in 4 parts
        return [d for d in dirs if d.is_dir()]

    def scan(self, root: Path, video: bool) -> Scan:
        key = self._key(root)
        if not key.is_file():
            raise AvsslError(f"{key}: not found; expected {self.layout}")
        dirs = self._flac_dirs(root)
        if not dirs:
            raise AvsslError(f"{root}: no ASVspoof2021_{self.track}_eval/flac/ folder; expected {self.layout}")
        rows = list(self._parse(key))
        audio: dict[str, Path] = {}
        for d in dirs:
            with os.scandir(d) as it:
                for entry in it:
                    if entry.name.endswith(".flac"):
                        audio.setdefault(entry.name[: -len(".flac")], Path(entry.path))
        scan = Scan()
        if unknown := sum(1 for r in rows if r[2] == "unknown" and r[3] == "spoof"):
            scan.notes.append(f"{key}: {unknown} spoof rows name no attack: attack 'unknown'")
        for speaker, utt, attack, label, extra in rows:
            path = audio.get(utt, dirs[0] / f"{utt}.flac")  # a missing one is reported when read
            scan.items.append(_asvspoof_entry(speaker, utt, label, attack, "test", path, extra))
        return scan

    def _parse(self, path: Path) -> Iterable[tuple[str, str, str, str, dict[str, Any]]]:
        for lineno, line in _read_lines(path):
            f = line.split()
            k = next((i for i in range(4, len(f)) if f[i] in ("trim", "notrim")), None)
            ok = k is not None and k + 1 < len(f) and f[k - 1] in ("bonafide", "spoof")
            ok = ok and (f[k + 1] in self.SUBSETS or f[k + 1].startswith("hidden"))
            if not ok:
                raise _protocol_error(path, lineno, self.expected, line)
            extra: dict[str, Any] = {"codec": f[2], "trim": f[k], "subset": f[k + 1]}
            if self.track == "LA":
                extra["transmission"] = f[3]
            else:
                extra["source"] = f[3]
                if k + 2 < len(f):
                    extra["vocoder"] = f[k + 2]
            attack = f[k - 2]
            if f[k - 1] == "spoof" and attack in ("-", "bonafide"):  # the schema needs an attack id for a spoof
                attack = "unknown"
            yield f[0], f[1], attack, f[k - 1], extra

    def write_lists(self, root: Path, out: Path, written: list[Item]) -> list[str]:
        files = _write_cm_protocols(out, written, {"cm_test_eval.txt": lambda i: i.extra.get("subset") == "eval"})
        files.append(_copy(self._key(root), out, f"{PROTOCOLS_DIR}/{self.track}_CM_trial_metadata.txt"))
        asv = root / "keys" / self.track / "ASV"
        if (asv / "trial_metadata.txt").is_file():  # LA only: ASV key and scores, for t-DCF
            files.append(_copy(asv / "trial_metadata.txt", out, f"{PROTOCOLS_DIR}/{self.track}_ASV_trial_metadata.txt"))
            for score in sorted(asv.glob("*/score.txt")):
                files.append(_copy(score, out, f"{PROTOCOLS_DIR}/{self.track}_ASV_{score.parent.name}_score.txt"))
        return files


class InTheWild(Preparer):
    """In-the-Wild (Müller et al. 2022): test only; label bona-fide -> bonafide with attack "-",
    spoof -> attack "ITW" (the schema needs an attack id; the corpus names no systems)."""

    name = "in_the_wild"
    layout = "In-the-Wild's release_in_the_wild/<n>.wav and meta.csv (header file,speaker,label)"
    LABELS = {"bona-fide": "bonafide", "spoof": "spoof"}

    def _meta(self, root: Path) -> Path:
        for meta in (root / "meta.csv", root / "release_in_the_wild" / "meta.csv"):
            if meta.is_file():
                return meta
        raise AvsslError(f"{root}: no meta.csv (nor release_in_the_wild/meta.csv); expected {self.layout}")

    def scan(self, root: Path, video: bool) -> Scan:
        meta = self._meta(root)
        scan = Scan()
        with open(meta, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None or [h.strip().lower() for h in header] != ["file", "speaker", "label"]:
                raise _protocol_error(meta, 1, "the header 'file,speaker,label'", ",".join(header or []))
            for row in reader:
                if not row or not "".join(row).strip():
                    continue
                if len(row) != 3 or row[2].strip() not in self.LABELS or not row[0].strip():
                    raise _protocol_error(meta, reader.line_num, "'<n>.wav,<speaker>,<bona-fide|spoof>'", ",".join(row))
                name, speaker, label = (c.strip() for c in row)
                key = self.LABELS[label]
                attack = "-" if key == "bonafide" else "ITW"
                scan.items.append(Item(Path(name).stem, speaker, "test", audio=meta.parent / name, spoof=key, attack=attack))
        return scan

    def write_lists(self, root: Path, out: Path, written: list[Item]) -> list[str]:
        return _write_cm_protocols(out, written) + [_copy(self._meta(root), out, f"{PROTOCOLS_DIR}/meta.csv")]


EMOTION_NAMES = {
    "ang": "ANG", "angry": "ANG", "anger": "ANG", "dis": "DIS", "disgust": "DIS", "disgusted": "DIS",
    "fea": "FEA", "fear": "FEA", "fearful": "FEA", "hap": "HAP", "happy": "HAP", "happiness": "HAP", "joy": "HAP",
    "neu": "NEU", "neutral": "NEU", "sad": "SAD", "sadness": "SAD",
}
SPOOF_NAMES = {"bonafide": "bonafide", "bona-fide": "bonafide", "bona fide": "bonafide", "genuine": "bonafide",
               "real": "bonafide", "spoof": "spoof", "fake": "spoof", "deepfake": "spoof"}
LABEL_COLUMNS = ("path", "id", "speaker", "emotion", "spoof", "attack", "split")


def _folder_utterance(relative: Path) -> str:
    """A file's utterance id: its path under the root without the extension, whitespace as "_"
    (trial lists are whitespace-separated)."""
    return "_".join(relative.with_suffix("").as_posix().lstrip("./").split())


class Folder(Preparer):
    """Any tree of a user's audio and video files (`avssl data prepare folder --root DIR`).

    - Every supported file is read (`avssl.data.media.SUPPORTED`, any letter case, spaces in
      names); every other file is skipped and listed. An audio and a video file with the same name
      in the same folder form one sample; a video alone gives audio and frames from its own
      container (video-only when it has no sound), an audio file alone an audio-only sample.
    - Utterance id: the path under the root without its extension, whitespace as "_"
      (`p225/p225_001`).
    - Labels: from `--labels CSV` (a header with `path` or `id`, and any of speaker, emotion, spoof,
      attack, split; `path` is relative to the root, with or without the extension), else the
      speaker is the file's folder name and the sample is bona fide, emotion unknown, split
      "train". `--test-speakers N` puts the last N speakers (sorted) in "test" where the CSV gives
      no split, and their bona fide clips get verification trials (`trials/folder_test.txt`:
      every same-speaker pair and as many different-speaker pairs, at most 2,000 of each).
    - A CSV row naming no file, or a value the schema does not know (an emotion outside
      ANG/DIS/FEA/HAP/NEU/SAD and their English names, a spoof label outside bonafide/spoof), stops
      the run before anything is decoded, with the file and line.
    """

    name = "folder"
    layout = f"any folder of media files ({SUPPORTED}), speaker = the file's folder"

    def __init__(self, labels: Path | None = None, test_speakers: int = 0) -> None:
        self.labels = labels
        self.test_speakers = test_speakers

    def _read_labels(self, root: Path) -> dict[str, dict[str, str]]:
        path = self.labels
        if path is None:
            return {}
        if not path.is_file():
            raise AvsslError(f"{path}: labels file not found (--labels)")
        rows: dict[str, dict[str, str]] = {}
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = [h.strip().lower() for h in reader.fieldnames or []]
            if not ({"path", "id"} & set(header)):
                raise _protocol_error(path, 1, "a header with a 'path' or 'id' column (and any of speaker, emotion, spoof, "
                                      "attack, split)", ",".join(reader.fieldnames or []))
            reader.fieldnames = header
            for row in reader:
                row = {k: (v or "").strip() for k, v in row.items() if k}
                if not any(row.values()):
                    continue
                ref = row.get("path") or row.get("id")
                if not ref:
                    raise _protocol_error(path, reader.line_num, "a path or id in every row", ",".join(row.values()))
                if row.get("emotion") and row["emotion"].lower() not in EMOTION_NAMES:
                    raise _protocol_error(path, reader.line_num, f"an emotion among {', '.join(sorted(set(EMOTION_NAMES)))}",
                                          ",".join(row.values()))
                if row.get("spoof") and row["spoof"].lower() not in SPOOF_NAMES:
                    raise _protocol_error(path, reader.line_num, f"a spoof label among {', '.join(SPOOF_NAMES)}",
                                          ",".join(row.values()))
                if row.get("split") and row["split"] not in SPLITS:
                    raise _protocol_error(path, reader.line_num, f"a split among {', '.join(SPLITS)}", ",".join(row.values()))
                key = _folder_utterance(Path(ref)) if media_kind(Path(ref)) else _folder_utterance(Path(ref + ".x"))
                row["_line"] = str(reader.line_num)
                rows[key] = row
        return rows

    def scan(self, root: Path, video: bool) -> Scan:
        scan = Scan()
        labels = self._read_labels(root)
        groups: dict[str, dict[str, Path]] = {}
        for path in _files(root, AUDIO_EXTENSIONS + VIDEO_EXTENSIONS, scan):
            if self.labels is not None and path.resolve() == self.labels.resolve():
                continue
            kind = media_kind(path)
            utt = _folder_utterance(path.relative_to(root))
            if kind in groups.get(utt, {}):
                scan.bad(path, f"skipped: same name as {groups[utt][kind]} (one {kind} file per utterance)")
                continue
            if kind == "video" and not video:
                if "audio" in groups.get(utt, {}):
                    scan.bad(path, "skipped: --no-video (its audio file is used)")
                    continue
            groups.setdefault(utt, {})[kind] = path
        for ref, row in labels.items():
            if ref not in groups:
                raise AvsslError(f"{self.labels}:{row['_line']}: {ref!r} names no media file under {root}")
        speakers: dict[str, str] = {}
        for utt, files in sorted(groups.items()):
            row = labels.get(utt, {})
            parent = Path(utt).parent.name
            speakers[utt] = row.get("speaker") or (parent if parent else Path(utt).name)
        test = set(sorted(set(speakers.values()))[len(set(speakers.values())) - self.test_speakers:]) if self.test_speakers else set()
        for utt, files in sorted(groups.items()):
            row = labels.get(utt, {})
            spoof = SPOOF_NAMES[row["spoof"].lower()] if row.get("spoof") else "bonafide"
            attack = row.get("attack") or ("-" if spoof == "bonafide" else "unknown")
            if spoof == "bonafide":
                attack = "-"
            emotion = EMOTION_NAMES[row["emotion"].lower()] if row.get("emotion") else None
            split = row.get("split") or ("test" if speakers[utt] in test else "train")
            vid = files.get("video") if video else None
            audio, optional = (files["audio"], False) if "audio" in files else (files["video"], True)
            extra = {k: v for k, v in row.items() if k not in LABEL_COLUMNS and not k.startswith("_") and v}
            extra["source"] = str(files.get("audio") or files["video"])
            scan.items.append(Item(utt, speakers[utt], split, audio=audio, video=vid, emotion=emotion, spoof=spoof,
                                   attack=attack, extra=extra, audio_optional=optional))
        if not labels:
            scan.notes.append("no --labels: speaker = folder name, every file bona fide, emotion unknown")
        return scan

    def write_lists(self, root: Path, out: Path, written: list[Item]) -> list[str]:
        tests = [i for i in written if i.split == "test" and i.spoof == "bonafide"]
        if len({i.speaker for i in tests}) < 2:
            return []
        rng = np.random.default_rng(0)
        same = [(a, b) for k, a in enumerate(tests) for b in tests[k + 1:] if a.speaker == b.speaker]
        diff = [(a, b) for k, a in enumerate(tests) for b in tests[k + 1:] if a.speaker != b.speaker]
        pick = lambda pairs, n: [pairs[i] for i in sorted(rng.choice(len(pairs), min(n, len(pairs)), replace=False))]
        same = pick(same, 2000)
        diff = pick(diff, max(len(same), 1))
        lines = [f"1 {a.utterance} {b.utterance}\n" for a, b in same] + [f"0 {a.utterance} {b.utterance}\n" for a, b in diff]
        name = f"{TRIALS_DIR}/folder_test.txt"
        atomic_write_text(out / name, "".join(lines))
        return [name]


DATASETS: dict[str, Preparer] = {
    p.name: p
    for p in (
        VoxCeleb1(), VoxCeleb2(), CremaD(), Ravdess(), ASVspoof2019LA(),
        ASVspoof2021("LA"), ASVspoof2021("DF"), InTheWild(), Folder(),
    )
}


# ----------------------------------------------------------------------------- the run


def _subsample(items: list[Item], limit: int | None) -> list[Item]:
    """At most `limit` items, evenly spaced over the sorted list so a smoke run still sees every
    split and many speakers (the first N would often be one speaker of one split)."""
    if limit is not None and limit < 1:
        raise AvsslError(f"--limit must be at least 1, got {limit}")
    if limit is None or limit >= len(items):
        return items
    idx = np.unique(np.linspace(0, len(items) - 1, limit).round().astype(np.int64))
    return [items[i] for i in idx]


_SHARD_NAME = re.compile(r"\.?(train|val|test)-\d{6}\.tar(\.tmp)?")


def _remove_stale_shards(out: Path, keep: set[str] = frozenset()) -> int:
    """An interrupted run (no index.json) leaves shards that no index lists: remove them, but the
    finished ones a resumed run keeps."""
    stale = [p for p in out.iterdir() if _SHARD_NAME.fullmatch(p.name) and p.is_file() and p.name not in keep] if out.is_dir() else []
    for p in stale:
        p.unlink()
    return len(stale)


def _stats_split(counts: dict[str, int]) -> str:
    return "train" if counts.get("train") else next(s for s in SPLITS if counts.get(s))


RECOMPUTE_STATS_CLIPS = 10_000


def _dedupe(items: list[Item], unreadable: list[tuple[str, str]]) -> list[Item]:
    """Drop items whose shard key repeats an earlier one (CorpusWriter would stop the run)."""
    seen: dict[str, Item] = {}
    out = []
    for item in items:
        key = utterance_to_key(item.utterance)
        if key in seen:
            kept = seen[key].audio or seen[key].video
            unreadable.append((str(item.audio or item.video), f"duplicate utterance id {item.utterance!r} (kept {kept})"))
            continue
        seen[key] = item
        out.append(item)
    return out


def _resume(name: str, out: Path, started: float) -> PrepareSummary:
    index = CorpusIndex.load(out)
    if index.data.get("dataset") != name:
        raise AvsslError(
            f"{out}: already holds a prepared {index.data.get('dataset')!r} corpus, not {name!r}; choose another --out"
        )
    counts = {s: index.count(s) for s in index.splits}
    previous = read_json(out / SUMMARY_FILE) if (out / SUMMARY_FILE).is_file() else {}
    notes = [f"{out / INDEX_FILE} exists: {name} is already prepared; nothing redone (delete {out} to start over)"]
    if not (out / STATS_FILE).is_file():
        from avssl.data.stats import compute_stats

        # Reading shards back decodes their video too: cap the clips so this stays minutes, not days.
        split = _stats_split(counts)
        compute_stats(out, FeatureConfig(), split=split, max_clips=RECOMPUTE_STATS_CLIPS)
        notes.append(f"{STATS_FILE} was missing: recomputed from the first {RECOMPUTE_STATS_CLIPS} clips of {split!r}")
    log.info(notes[0])
    return PrepareSummary(
        dataset=name, out=out, counts=counts,
        unreadable=[tuple(u) for u in previous.get("unreadable", [])],
        elapsed=time.monotonic() - started, resumed=True,
        files=list(previous.get("files", [])), notes=notes,
    )


PROGRESS_FILE = ".prepare-progress.json"


def _fingerprint(name: str, items: list[Item], faces: FaceConfig, video: bool) -> str:
    """The inputs a resumed run must share with the interrupted one: dataset, utterances in
    order with their files and labels, face settings."""
    import hashlib

    h = hashlib.sha256(f"{name}|{video}|{faces.model_dump_json()}".encode())
    for item in items:
        h.update(f"\n{item.utterance}|{item.audio}|{item.video}|{item.split}|{item.speaker}|{item.emotion}|{item.spoof}|"
                 f"{item.attack}".encode())
    return h.hexdigest()


class _Progress:
    """The running totals of a preparation, saved at each checkpoint so a crash can resume."""

    def __init__(self, path: Path, fingerprint: str) -> None:
        self.path, self.fingerprint = path, fingerprint
        self.counts: Counter[str] = Counter()
        self.modalities: Counter[str] = Counter()
        self.moments: dict[str, RunningMoments] = {}
        self.stat_clips: Counter[str] = Counter()
        self.failed: list[int] = []

    def wrote(self, split: str, members: dict[str, bytes], clip_moments: tuple | None) -> None:
        self.counts[split] += 1
        self.modalities["audio+video" if {"flac", "mp4"} <= set(members) else "audio" if "flac" in members else "video"] += 1
        if clip_moments is not None:
            self.moments.setdefault(split, RunningMoments()).merge(*clip_moments)
            self.stat_clips[split] += 1

    def save(self, done: int, writer: CorpusWriter, unreadable: list[tuple[str, str]]) -> None:
        write_json(self.path, {
            "fingerprint": self.fingerprint, "items_done": done, "writer": writer.state(),
            "counts": self.counts, "modalities": self.modalities, "stat_clips": self.stat_clips,
            "moments": {k: [m.n, m.mean, m.m2] for k, m in self.moments.items()},
            "failed": self.failed, "unreadable": [list(u) for u in unreadable],
        })

    def resume(self, writer: CorpusWriter, scan: Scan) -> int:
        """Restore a matching checkpoint into `writer` and self; the number of utterances done."""
        if not self.path.is_file():
            return 0
        state = read_json(self.path)
        if state.get("fingerprint") != self.fingerprint:
            scan.notes.append(f"{self.path}: from a run with other inputs; starting from scratch")
            self.path.unlink()
            return 0
        writer.restore(state["writer"])
        self.counts, self.modalities = Counter(state["counts"]), Counter(state["modalities"])
        self.stat_clips = Counter(state["stat_clips"])
        for split, (n, mean, m2) in state["moments"].items():
            self.moments[split] = RunningMoments()
            self.moments[split].merge(n, mean, m2)
        self.failed = list(state["failed"])
        scan.unreadable[:] = [tuple(u) for u in state["unreadable"]]
        return int(state["items_done"])


def convert(item: Item, dataset: str, faces: FaceConfig | None) -> tuple:
    """One utterance, in a worker: decoded, face-cropped, encoded as a shard sample, with its fbank
    moments for stats.json. -> (members or None, meta, key, problems, (n, mean, m2) or None)."""
    import torch

    problems: list[tuple[str, str]] = []
    clip = load_clip(item, dataset, problems, faces)
    if clip is None:
        return None, None, None, problems, None
    moments = None
    if clip.audio is not None:
        m = RunningMoments()
        m.update(fbank(torch.from_numpy(clip.audio), FeatureConfig()))
        moments = (m.n, m.mean, m.m2)
    return encode_clip(clip), clip.meta, clip.key, problems, moments


def _convert_batch(items: list[Item], dataset: str, faces: FaceConfig | None) -> list[tuple]:
    return [convert(item, dataset, faces) for item in items]


def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)  # one process per core: no intra-op threads on top


def converted(items: list[Item], dataset: str, faces: FaceConfig | None, workers: int, address: str | None) -> Iterator[tuple]:
    """`convert` of every item, yielded in item order: in this process (workers=1), in a pool of
    `workers` processes, or as Ray tasks on the cluster at `address` ("local" starts one here).

    At most a few batches per worker are in flight, so memory does not grow with the dataset."""
    if address is not None:
        yield from _converted_on_ray(items, dataset, faces, address)
        return
    workers = min(workers, -(-len(items) // 16))  # starting a process costs seconds: not for a handful of files
    if workers <= 1:
        for item in items:
            yield convert(item, dataset, faces)
        return
    import multiprocessing
    from collections import deque
    from concurrent.futures import ProcessPoolExecutor

    batch = 4
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init) as pool:
        pending: deque = deque()
        for i in range(0, len(items), batch):
            pending.append(pool.submit(_convert_batch, items[i : i + batch], dataset, faces))
            if len(pending) >= 3 * workers:
                yield from pending.popleft().result()
        while pending:
            yield from pending.popleft().result()


def _converted_on_ray(items: list[Item], dataset: str, faces: FaceConfig | None, address: str) -> Iterator[tuple]:
    """Ray tasks of a few items each; the media must be at the same path on every node (shared
    storage) and avssl installed there (cluster/ray-cluster.yaml's image)."""
    from collections import deque

    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(address=address, log_to_driver=False, configure_logging=False,  # "local": a new instance, never a guess
                 **({"include_dashboard": False} if address == "local" else {}))
    try:
        task = ray.remote(num_cpus=1)(_convert_batch)
        window = max(2, 3 * int(ray.cluster_resources().get("CPU", 1)))
        pending: deque = deque()
        batch = 8
        for i in range(0, len(items), batch):
            pending.append(task.remote(items[i : i + batch], dataset, faces))
            if len(pending) >= window:
                yield from ray.get(pending.popleft())
        while pending:
            yield from ray.get(pending.popleft())
    finally:
        if started:
            ray.shutdown()


def prepare_dataset(
    name: str,
    root: Path,
    out: Path,
    shards: ShardConfig | None = None,
    limit: int | None = None,
    video: bool = True,
    faces: FaceConfig | None = None,
    workers: int | None = None,
    address: str | None = None,
    labels: Path | None = None,
    test_speakers: int = 0,
    checkpoint_items: int = 2000,
    checkpoint_seconds: float = 600.0,
) -> PrepareSummary:
    """Convert dataset `name` (a key of DATASETS) from `root` into a corpus at `out`.

    `limit` caps the utterances read (evenly spaced over the dataset, for smoke runs); `video=False`
    reads audio only. `faces` says how video frames are cropped (default: the dataset's own
    default, `auto` but for VoxCeleb2's already-cropped videos). `workers` processes (default:
    every core) decode and encode in parallel, or Ray tasks on the cluster at `address`; shards are
    written in item order either way, so the corpus does not depend on them. `labels` and
    `test_speakers` are for the `folder` dataset. Returns the summary (also written to
    `<out>/prepare.json`). See the module docstring for layouts, splits, lists and the failure and
    resume policy.
    """
    from avssl.data.stats import stats_from_moments

    started = time.monotonic()
    if name not in DATASETS:
        raise AvsslError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    preparer = Folder(Path(labels) if labels else None, test_speakers) if name == "folder" else DATASETS[name]
    if name != "folder" and (labels or test_speakers):
        raise AvsslError(f"--labels and --test-speakers are for `prepare folder`; {name} brings its own labels")
    faces = faces or FaceConfig(mode=preparer.faces_default)
    workers = max(1, workers if workers is not None else (os.cpu_count() or 1))
    root, out = Path(root), Path(out)
    if (out / INDEX_FILE).is_file():
        return _resume(name, out, started)
    if not root.is_dir():
        raise AvsslError(f"{root}: dataset root not found; expected a folder with {preparer.layout}")

    scan = preparer.scan(root, video)
    if not scan.items:
        raise AvsslError(f"{root}: no utterances found; expected {preparer.layout}")
    unique = _dedupe(scan.items, scan.unreadable)
    items = _subsample(unique, limit)
    if len(items) < len(unique):
        scan.notes.append(f"--limit {limit}: {len(items)} of {len(unique)} utterances, evenly spaced")
    out.mkdir(parents=True, exist_ok=True)
    expected = Counter(i.split for i in items)
    writer = CorpusWriter(out, shards or ShardConfig(), dataset=name, expected_per_split=dict(expected))
    # stats.json: the same fbank moments `avssl.data.stats.compute_stats` takes from the shards
    # (every clip of the stats split, in order), gathered while the audio is in memory; reading
    # the shards back would decode every video again (days for VoxCeleb2). Kept per split because
    # which split is used ("train", else the first) is only known once the unreadable are out.
    features = FeatureConfig()
    run = _Progress(out / PROGRESS_FILE, _fingerprint(name, items, faces, video))
    start = run.resume(writer, scan)
    if removed := _remove_stale_shards(out, keep={f["file"] for v in writer.state()["done"].values() for f in v}):
        scan.notes.append(f"removed {removed} shard files of an interrupted run")
    if start:
        scan.notes.append(f"resumed an interrupted run after {start} of {len(items)} utterances ({out / PROGRESS_FILE})")
    unreadable = scan.unreadable
    # CorpusWriter's `with` form would call close() a second time, without our index extras:
    # close it once ourselves and only use __exit__ to drop half-written shards on failure.
    try:
        where = f"Ray at {address}" if address else f"{workers} process{'es' if workers > 1 else ''}"
        last = time.monotonic()
        with progress_bar(f"preparing {name} ({where})", len(items)) as bar:
            bar.advance(start) if start else None
            results = converted(items[start:], name, faces, workers, address)
            for i, (members, meta, key, problems, clip_moments) in enumerate(results, start):
                unreadable.extend(problems)
                if members is not None:
                    writer.write_encoded(meta, key, members)
                    run.wrote(items[i].split, members, clip_moments)
                else:
                    run.failed.append(i)
                if problems:
                    bar.describe(f"preparing {name} ({len(unreadable)} skipped or degraded)")
                bar.advance()
                # Checkpoints on fixed utterance counts (time only forces one sooner): a resumed
                # corpus is cut into the same shards as one prepared in one go.
                if (i + 1) % checkpoint_items == 0 or time.monotonic() - last > checkpoint_seconds:
                    writer.flush()
                    run.save(i + 1, writer, unreadable)
                    last = time.monotonic()
        failed = set(run.failed)
        written = [item for i, item in enumerate(items) if i not in failed]
        if not written:
            first = unreadable[0] if unreadable else "?"
            raise AvsslError(f"{root}: none of {len(items)} utterances could be read; first problem: {first}")
        files = preparer.write_lists(root, out, written)
    except BaseException as exc:
        writer.__exit__(type(exc), exc, exc.__traceback__)
        raise
    counts, modalities, moments, stat_clips = run.counts, run.modalities, run.moments, run.stat_clips
    scan.notes.append("samples: " + ", ".join(f"{k} {v}" for k, v in sorted(modalities.items())))
    summary = PrepareSummary(
        dataset=name, out=out, counts={s: counts[s] for s in SPLITS if counts[s]},
        unreadable=unreadable, elapsed=0.0, files=files, notes=scan.notes,
    )
    write_json(out / SUMMARY_FILE, summary.to_dict())
    writer.close(extra={"source": str(root.resolve()), "prepared_by": __name__, "limit": limit, "video": video,
                        "faces": faces.model_dump(mode="json")})
    stats_split = _stats_split(summary.counts)
    if stat_clips[stats_split]:
        save_stats(out, stats_from_moments(moments[stats_split], features, stat_clips[stats_split]))
    else:
        summary.notes.append(f"split {stats_split!r} has no audio: {STATS_FILE} not written")
    summary.elapsed = time.monotonic() - started
    write_json(out / SUMMARY_FILE, summary.to_dict())
    (out / PROGRESS_FILE).unlink(missing_ok=True)
    return summary
