"""Loading a user's media file (wav, flac, m4a, mp4, ...) into a Clip: 16 kHz mono audio and RGB frames."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from avssl import AvsslError
from avssl.data.features import resample
from avssl.data.schema import SAMPLE_RATE, Clip, Meta, decode_audio, decode_video

AUDIO_ONLY = {".wav", ".flac", ".ogg"}


def _audio_track(path: Path) -> np.ndarray | None:
    """The first audio stream of a container, decoded with PyAV, as float32 mono at 16 kHz."""
    import av

    with av.open(str(path)) as container:
        if not container.streams.audio:
            return None
        resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
        chunks = []
        for frame in container.decode(container.streams.audio[0]):
            for out in resampler.resample(frame):
                chunks.append(out.to_ndarray().reshape(-1))
        for out in resampler.resample(None):
            chunks.append(out.to_ndarray().reshape(-1))
    return np.concatenate(chunks).astype(np.float32) if chunks else None


def load_media(path: str | Path) -> Clip:
    path = Path(path)
    if not path.is_file():
        raise AvsslError(f"{path}: file not found")
    try:
        if path.suffix.lower() in AUDIO_ONLY:
            wave, sr = decode_audio(path.read_bytes())
            audio, video, fps = resample(wave, sr), None, None
        else:
            audio = _audio_track(path)
            try:
                video, fps = decode_video(path.read_bytes())
            except Exception:
                video, fps = None, None
    except Exception as exc:
        raise AvsslError(f"{path}: cannot decode ({exc}); supported: wav, flac, ogg, m4a, mp4, flv, mkv") from None
    if (audio is None or audio.size == 0) and video is None:
        raise AvsslError(f"{path}: no audio or video stream")
    duration = len(audio) / SAMPLE_RATE if audio is not None else len(video) / fps
    meta = Meta(dataset="user", speaker="?", utterance=path.stem, duration=duration, fps=fps, split="test")
    return Clip(meta=meta, audio=audio, video=video)
