"""Reading a user's media files: the one list of supported formats, and one reader for audio and video.

Preparation (`avssl data prepare`) and inference (`avssl embed`, `verify`, `predict`) read files
through these functions, so a file that prepares also embeds and the formats named in help texts
and errors are the formats that work (tests/test_media.py decodes each one).

- Audio: WAV (any rate; 8/16/24/32-bit integer, 32/64-bit float) and FLAC through soundfile;
  MP3, M4A/AAC, OGG/Vorbis, Opus and a video container's audio track through PyAV. Channels are
  averaged and the rate converted to 16 kHz (`avssl.data.features.resample`).
- Video: MP4, MKV, WebM, AVI, MPEG-1/2 (.mpg, .mpeg), FLV and MOV through PyAV, read frame by frame;
  with a `FaceConfig` the frames become square crops of the talking face (`avssl.data.faces`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from avssl import AvsslError
from avssl.data.features import resample
from avssl.data.schema import SAMPLE_RATE, Clip, Meta, decode_video

AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".m4a", ".aac", ".ogg", ".opus")
VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".flv", ".mov")
SOUNDFILE_EXTENSIONS = (".wav", ".flac")
SUPPORTED = "audio " + ", ".join(e[1:] for e in AUDIO_EXTENSIONS) + "; video " + ", ".join(e[1:] for e in VIDEO_EXTENSIONS)


def media_kind(path: Path) -> str | None:
    """'audio', 'video' or None (not a supported media file), by extension, any letter case."""
    suffix = path.suffix.lower()
    return "audio" if suffix in AUDIO_EXTENSIONS else "video" if suffix in VIDEO_EXTENSIONS else None


def media_file_kind(path: Path) -> str:
    """'audio' or 'video' for a file a user named; AvsslError naming it when it is a directory,
    missing, or not of a supported format."""
    if path.is_dir():
        raise AvsslError(f"{path}: is a directory; give media files ({SUPPORTED})")
    if not path.is_file():
        raise AvsslError(f"{path}: file not found")
    kind = media_kind(path)
    if kind is None:
        raise AvsslError(f"{path}: not a supported media file ({SUPPORTED})")
    return kind


def read_audio(path: Path) -> np.ndarray:
    """Any audio file or a container's first audio stream -> float32 [N] mono at 16 kHz.

    Raises ValueError("no audio stream") for a container without one.
    """
    if path.suffix.lower() in SOUNDFILE_EXTENSIONS:
        import soundfile as sf

        wave, sr = sf.read(str(path), dtype="float32", always_2d=True)
        wave = wave.mean(axis=1)
    else:
        import av

        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise ValueError("no audio stream")
            stream = container.streams.audio[0]
            sr = stream.rate
            # Packed float mono at the source rate: PyAV only converts the sample format here, so
            # every format goes through the same resampler below.
            converter = av.AudioResampler(format="flt", layout="mono", rate=sr)
            chunks = [f.to_ndarray().reshape(-1) for frame in container.decode(stream) for f in converter.resample(frame)]
            chunks += [f.to_ndarray().reshape(-1) for f in converter.resample(None)]
        wave = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
    if wave.size == 0:
        raise ValueError("no audio samples")
    return np.ascontiguousarray(resample(wave.astype(np.float32, copy=False), int(sr)), dtype=np.float32)


def video_fps(path: Path) -> float:
    import av

    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        stream = container.streams.video[0]
        return float(stream.average_rate or stream.guessed_rate or 25)


def read_video(path: Path, faces=None) -> tuple[np.ndarray | None, float, dict | None]:
    """Video file -> (uint8 [T, H, W, 3] RGB or None when no face is found, fps, face summary).

    With `faces` (an `avssl.data.faces.FaceConfig` whose mode is not "off") the frames are the
    square face crops and the summary says how they were made; without, the whole frames.
    """
    fps = video_fps(path)
    if faces is None or faces.mode == "off":
        frames, fps = decode_video(path.read_bytes())
        return frames, fps, None
    from avssl.data.faces import face_crops

    crops, track = face_crops(path, faces)
    return crops, fps, track.summary() if track is not None else None


def load_media(path: str | Path, faces=...) -> Clip:
    """A user's file -> Clip (audio and/or video), for inference. Errors name the file.

    Video frames are face crops made as in preparation (`FaceConfig()` unless `faces` is given;
    None keeps whole frames)."""
    if faces is ...:
        from avssl.data.faces import FaceConfig

        faces = FaceConfig()
    path = Path(path)
    kind = media_file_kind(path)
    audio = video = fps = face = None
    try:
        if kind == "audio":
            audio = read_audio(path)
        else:
            try:
                audio = read_audio(path)
            except ValueError as exc:  # a video without sound is still a video
                if "no audio" not in str(exc):
                    raise
            video, fps, face = read_video(path, faces)
    except AvsslError:
        raise
    except Exception as exc:
        raise AvsslError(f"{path}: cannot decode ({str(exc).strip() or type(exc).__name__}); supported: {SUPPORTED}") from None
    if audio is None and video is None:
        reason = "no face found in its video and no audio stream" if face else "no audio or video stream"
        raise AvsslError(f"{path}: {reason}")
    duration = len(audio) / SAMPLE_RATE if audio is not None else len(video) / fps
    extra = {"face": face} if face else {}
    meta = Meta(dataset="user", speaker="?", utterance=path.stem, duration=duration, fps=fps if video is not None else None,
                split="test", extra=extra)
    return Clip(meta=meta, audio=audio, video=video)
