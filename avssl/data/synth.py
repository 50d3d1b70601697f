"""Synthetic audio-visual speech corpus: talking faces with speech-like audio, from a seed.

Every random draw comes from a numpy stream keyed by (seed, speaker) or (seed, speaker,
utterance), so a clip depends on nothing else and clips can be generated in any order or in
parallel (`generate_utterance`). The generative model:

- Identity (`SpeakerProfile`, drawn once per speaker). Voice: base F0 and pitch range, a
  vocal-tract factor scaling the formants, the speaker's own F1-F3 offsets and F4, a fixed
  extra resonance (timbre), speaking rate, spectral tilt, breathiness, jitter, bandwidths.
  Face: size and aspect of the face ellipse, skin, hair, iris and background colours, hair
  length and fringe, eye spacing and size, brow and mouth geometry.
- Speech. Words of consonant-vowel syllables, planned 0.3 s beyond both ends of the clip, so a
  clip is a window on running speech (silences at fixed places, a lead-in or a tail, would make
  unrelated clips' envelopes correlate). A sawtooth glottal source follows the F0 contour (a
  pitch accent per syllable, declination, jitter, tremor), is tilted by a one-pole low-pass,
  gated by each syllable's envelope and filtered by cascaded two-pole (Klatt) resonators at the
  vowel's formant targets scaled by the speaker. Onsets are band-passed noise (fricatives,
  plosive bursts after a closure) or nasal murmurs; pauses split words; a low noise floor fills
  the rest. Each nucleus is scaled to a planned RMS.
- Emotion (CREMA-D's six, round-robin over a speaker's utterances, a random intensity in
  [0.5, 1] per clip that interpolates from neutral): F0 level and range, rate, loudness, tremor,
  creak, tilt, breathiness and F1/F2 in the voice; brow height, angle and asymmetry, eye
  openness, mouth curvature, asymmetry, width and jaw opening in the face; `expression_scale`
  moves the face and `prosody_scale` the voice that many times as far from neutral.
- Sync. The mouth opening in video frame t is the mean over that frame's samples of the same
  planned syllable envelope that sets the audio level, so the per-frame audio RMS
  (`audio_envelope`) and the count of mouth-cavity pixels (`mouth_opening`) correlate. Rounded
  vowels (o, u) narrow the mouth. Head motion, zoom, lighting, blinks and pixel noise are
  independent of the audio.
- Spoofs. `spoof_fraction` of each speaker's bona fide utterances (`heldout_spoof_fraction` for
  the held-out speakers, when set) also appear spoofed by one attack of `cfg.attacks` (see
  `ATTACKS`), labelled spoof with the attack id, utterance id
  `<bona fide id>-<attack>`, and the bona fide speaker, emotion and split. A spoof shares the
  bona fide clip's video array (the same object: treat clip arrays as read-only), or with
  `spoof_video="faceswap"` the same face re-rendered with another speaker's inner face (an
  audio-visual deepfake, so that video-only spoof detection has something to find). The face's
  donor also lends its voice to the partial spoof A05.
- Splits. The last `heldout_speakers` speakers are "test"; `trials` draws VoxCeleb-style
  verification trials from their bona fide utterances only. A `val_fraction` of each train
  speaker's utterances are "val", the rest "train".
"""

from __future__ import annotations

import colorsys
import math
from collections.abc import Iterator
from dataclasses import dataclass, fields, replace
from functools import lru_cache
from typing import Literal

import numpy as np
from pydantic import Field, model_validator
from scipy import signal

from avssl.config import Section
from avssl.data.schema import EMOTIONS, SAMPLE_RATE, Clip, Meta

ATTACKS: dict[str, str] = {
    "A01": "vocoder resynthesis: STFT magnitude kept, phase randomized",
    "A02": "flattened prosody: resynthesized on a monotone at the utterance's mean F0, no jitter or tremor",
    "A03": "band-limited codec: 3.4 kHz low-pass and 6-bit mu-law quantization",
    "A04": "replay: loudspeaker band-pass and a reverberant room",
    "A05": "partial spoof: from a point in the middle third on, the same words in another speaker's voice",
}

# Distinct first entropy words keep the random streams of speakers, clips, spoof selection,
# validation selection and trials apart even when their indices coincide.
_SPEAKER_STREAM, _CLIP_STREAM, _SPOOF_STREAM, _VAL_STREAM, _TRIAL_STREAM = range(1, 6)


class SynthConfig(Section):
    """The synthetic corpus: speakers, clips, their size, spoofs, splits and trials."""

    seed: int = Field(0, ge=0, description="Seeds every random stream: same seed, bit-identical corpus.")
    num_speakers: int = Field(24, ge=3, description="Speakers in total, train plus held out.")
    utterances_per_speaker: int = Field(
        12,
        ge=len(EMOTIONS),
        description="Bona fide clips per speaker; emotions go round-robin, so at least one per emotion.",
    )
    clip_seconds: float = Field(2.0, ge=0.5, le=30.0, description="Duration of every clip.")
    sample_rate: Literal[16000] = Field(SAMPLE_RATE, description="Audio rate; fixed by the sample schema.")
    fps: float = Field(25.0, ge=5.0, le=120.0, description="Video frame rate.")
    image_size: int = Field(64, ge=24, le=512, description="Side of the square face frames, in pixels.")
    video: bool = Field(True, description="Render faces; False gives audio-only clips (faster).")
    spoof_fraction: float = Field(
        0.3, ge=0.0, le=1.0, description="Fraction of each speaker's bona fide utterances also spoofed."
    )
    heldout_spoof_fraction: float | None = Field(
        None, ge=0.0, le=1.0,
        description="Fraction of each held-out (test) speaker's bona fide utterances also spoofed; unset: "
        "spoof_fraction. Lets the evaluation split carry many spoofs per attack (as ASVspoof's eval does) while "
        "the training stream, which pretraining sees, keeps the share of spoof_fraction.",
    )
    attacks: list[str] = Field(
        default_factory=lambda: ["A01", "A02", "A03"],
        description=f"Attack ids used round-robin for spoofs, from {sorted(ATTACKS)}.",
    )
    spoof_video: Literal["bonafide", "faceswap"] = Field(
        "bonafide",
        description="A spoof's video: 'bonafide' reuses the bona fide clip's frames (audio-only attacks, as in "
        "ASVspoof); 'faceswap' makes every spoof an audio-visual deepfake (FakeAVCeleb's fake video, fake audio): "
        "the inner face (eyes, nose, mouth) is another speaker's skin, blended into the target's over a rim, "
        "with the same head motion, expression and mouth movement.",
    )
    heldout_speakers: int = Field(6, ge=2, description="Speakers kept out of training, for verification trials.")
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="Fraction of each train speaker's utterances in val.")
    trials_per_speaker: int = Field(
        40,
        ge=2,
        multiple_of=2,
        description="Trials enrolled on each held-out speaker, half target, half non-target; capped at "
        "twice the speaker's distinct utterance pairs.",
    )
    expression_scale: float = Field(
        1.0, ge=0.0, le=4.0,
        description="Scales how far each emotion moves the face from neutral (brows, eyes, mouth): 1 is the "
        "default geometry, 2.5 makes the six expressions plain at 64x64 pixels.",
    )
    prosody_scale: float = Field(
        1.0, ge=0.0, le=4.0,
        description="Scales how far each emotion moves the voice from neutral (F0, range, rate, loudness, "
        "voice quality, formants); 1 is the default.",
    )
    snr_db: float = Field(35.0, ge=0.0, le=80.0, description="Speech-to-noise-floor ratio (+-5 dB per clip).")

    @model_validator(mode="after")
    def _check_consistency(self) -> SynthConfig:
        if self.heldout_speakers >= self.num_speakers:
            raise ValueError(
                f"heldout_speakers ({self.heldout_speakers}) must be below num_speakers ({self.num_speakers}) "
                "so that some speakers remain for training"
            )
        unknown = sorted(set(self.attacks) - set(ATTACKS))
        if unknown:
            raise ValueError(f"unknown attack ids {unknown}; known: {sorted(ATTACKS)}")
        if len(set(self.attacks)) != len(self.attacks):
            raise ValueError(f"attacks {self.attacks} lists an id twice")
        if max(self.spoof_fraction, self.heldout_spoof_fraction or 0.0) > 0 and not self.attacks:
            raise ValueError("spoof_fraction or heldout_spoof_fraction > 0 needs at least one attack id in attacks")
        return self


# ---------------------------------------------------------------------------------------------
# Speakers


Colour = tuple[float, float, float]


@dataclass(frozen=True)
class Voice:
    f0_hz: float  # base F0 at neutral emotion
    f0_range_st: float  # spread of syllable pitch accents, semitones
    vocal_tract: float  # formant scale: > 1 is a shorter tract, higher formants
    rate_sps: float  # syllables per second at neutral emotion
    tilt: float  # one-pole low-pass coefficient on the source: higher is darker
    breathiness: float  # aspiration noise relative to the source RMS
    jitter_st: float  # slow random F0 wander, semitones
    bandwidth: float  # formant bandwidth scale
    formant_shift: tuple[float, float, float]  # the speaker's own F1-F3 offsets on top of the tract scale
    f4_hz: float
    timbre_hz: float  # a fixed extra resonance (sinus, pharynx) colouring all of the speaker's speech
    timbre_db: float


@dataclass(frozen=True)
class Face:
    """Geometry in units of half the image side, relative to the face centre; colours RGB 0-255."""

    width: float  # half-width of the face ellipse
    height: float  # half-height of the face ellipse
    skin: Colour
    hair: Colour
    iris: Colour
    background: Colour
    hair_length: float  # hair reaches this fraction of the way down the face's height
    fringe: float  # fringe covers this fraction of the face's half-height from the top
    eye_dx: float
    eye_y: float
    eye_rx: float
    eye_ry: float
    brow_gap: float  # brow above eye centre
    brow_len: float
    brow_thick: float
    brow_tilt: float  # resting inner-end slope
    nose_y: float
    mouth_y: float
    mouth_w: float  # half-width
    mouth_open: float  # cavity half-height at full opening
    lip_thick: float
    mouth_curv: float  # resting curvature: > 0 smiles


@dataclass(frozen=True)
class SpeakerProfile:
    id: str  # "spk0003"
    index: int
    sex: str  # "f" or "m": sets the F0 and vocal-tract ranges
    split: str  # "train" or "test" (held out)
    voice: Voice
    face: Face


_SKINS: tuple[Colour, ...] = (
    (240, 205, 180), (225, 180, 150), (200, 150, 115), (165, 115, 85), (125, 85, 60), (95, 65, 48),
)
_HAIRS: tuple[Colour, ...] = (
    (25, 22, 20), (70, 45, 30), (120, 85, 55), (190, 160, 110), (150, 150, 150), (110, 70, 50),
)
_IRISES: tuple[Colour, ...] = ((70, 100, 150), (80, 60, 40), (70, 110, 80), (50, 40, 30))
# The mouth cavity is the only colour with high red and very low green in any frame; lips,
# skins, hairs, irises and backgrounds all keep green >= 50 or red < 90 under lighting and noise,
# which is what `mouth_opening` relies on.
_CAVITY: Colour = (150.0, 22.0, 45.0)
_LIP_TINT = np.array([190.0, 95.0, 100.0])
_SCLERA = np.array([235.0, 235.0, 228.0])
_PUPIL = np.array([20.0, 18.0, 18.0])


def _pick_colour(rng: np.random.Generator, palette: tuple[Colour, ...], spread: float, blend: bool = False) -> Colour:
    """A palette entry (or, with `blend`, a point between two neighbours) plus uniform jitter."""
    pos = rng.uniform(0, len(palette) - 1) if blend else float(rng.integers(len(palette)))
    lo = int(pos)
    hi = min(lo + 1, len(palette) - 1)
    base = np.asarray(palette[lo], dtype=float) * (1 - (pos - lo)) + np.asarray(palette[hi], dtype=float) * (pos - lo)
    c = np.clip(base + rng.uniform(-spread, spread, 3), 0, 255)
    return (float(c[0]), float(c[1]), float(c[2]))


def _pick_background(rng: np.random.Generator) -> Colour:
    # Muted colours of any hue: the darkest channel stays >= 0.6 * 0.55 * 255 = 84, far from the cavity.
    r, g, b = colorsys.hsv_to_rgb(rng.uniform(0.0, 1.0), rng.uniform(0.1, 0.45), rng.uniform(0.6, 0.92))
    return (255.0 * r, 255.0 * g, 255.0 * b)


def _speaker_id(index: int) -> str:
    return f"spk{index:04d}"


def _speaker(cfg: SynthConfig, index: int) -> SpeakerProfile:
    rng = np.random.default_rng([cfg.seed, _SPEAKER_STREAM, index])
    sex = "f" if rng.random() < 0.5 else "m"
    female = sex == "f"
    voice = Voice(
        f0_hz=float(np.exp(rng.uniform(*np.log([165.0, 255.0] if female else [85.0, 145.0])))),
        f0_range_st=float(rng.uniform(1.5, 3.5)),
        vocal_tract=float(rng.uniform(1.06, 1.24) if female else rng.uniform(0.86, 1.04)),
        rate_sps=float(rng.uniform(3.5, 5.5)),
        tilt=float(rng.uniform(0.3, 0.75)),
        breathiness=float(rng.uniform(0.0, 0.15) + (0.05 if female else 0.0)),
        jitter_st=float(rng.uniform(0.1, 0.4)),
        bandwidth=float(rng.uniform(0.8, 1.3)),
        formant_shift=tuple(float(x) for x in np.clip(rng.normal(1.0, 0.06, 3), 0.85, 1.15)),
        f4_hz=float(rng.uniform(3200.0, 4200.0) * (1.08 if female else 1.0)),
        timbre_hz=float(rng.uniform(2500.0, 5500.0)),
        timbre_db=float(rng.uniform(6.0, 14.0)),
    )
    width = float(rng.uniform(0.48, 0.62))
    height = float(min(width * rng.uniform(1.12, 1.38), 0.8))
    eye_rx = width * float(rng.uniform(0.12, 0.17))
    eye_ry = eye_rx * float(rng.uniform(0.55, 0.75))
    eye_y = -height * float(rng.uniform(0.12, 0.28))
    brow_gap = eye_ry + eye_rx * float(rng.uniform(0.5, 0.9))
    brow_thick = width * float(rng.uniform(0.05, 0.09))
    # The fringe stops above the highest brow an emotion can raise (0.08 units of raise + slope).
    lowest_fringe = height + eye_y - brow_gap - brow_thick - 0.12
    fringe = float(min(rng.uniform(0.1, 0.45), max(lowest_fringe, 0.0) / height))
    mouth_y = height * float(rng.uniform(0.42, 0.56))
    face = Face(
        width=width,
        height=height,
        skin=_pick_colour(rng, _SKINS, 6, blend=True),
        hair=_pick_colour(rng, _HAIRS, 15),
        iris=_pick_colour(rng, _IRISES, 10),
        background=_pick_background(rng),
        hair_length=float(rng.uniform(0.3, 1.0)),
        fringe=fringe,
        eye_dx=width * float(rng.uniform(0.36, 0.46)),
        eye_y=eye_y,
        eye_rx=eye_rx,
        eye_ry=eye_ry,
        brow_gap=brow_gap,
        brow_len=eye_rx * float(rng.uniform(2.0, 2.6)),
        brow_thick=brow_thick,
        brow_tilt=float(rng.normal(0.0, 0.08)),
        nose_y=eye_y + (mouth_y - eye_y) * float(rng.uniform(0.5, 0.65)),
        mouth_y=mouth_y,
        mouth_w=width * float(rng.uniform(0.34, 0.46)),
        mouth_open=height * float(rng.uniform(0.13, 0.18)),
        lip_thick=height * float(rng.uniform(0.035, 0.05)),
        mouth_curv=float(rng.normal(0.0, 0.08)),
    )
    split = "test" if _is_heldout(cfg, index) else "train"
    return SpeakerProfile(id=_speaker_id(index), index=index, sex=sex, split=split, voice=voice, face=face)


def speakers(cfg: SynthConfig) -> list[SpeakerProfile]:
    """Every speaker's identity, in index order; the last `heldout_speakers` are split "test"."""
    return [_speaker(cfg, i) for i in range(cfg.num_speakers)]


# ---------------------------------------------------------------------------------------------
# Emotions


@dataclass(frozen=True)
class _Style:
    """How an emotion departs from neutral speech and a neutral face (defaults are neutral)."""

    f0_shift_st: float = 0.0
    range_mult: float = 1.0
    rate_mult: float = 1.0
    loudness: float = 1.0
    tremor_st: float = 0.0
    jitter_mult: float = 1.0
    creak: float = 0.0  # depth of alternate-cycle amplitude loss (vocal fry)
    tilt_delta: float = 0.0
    breath_add: float = 0.0
    f1_mult: float = 1.0
    f2_mult: float = 1.0
    brow_raise: float = 0.0
    brow_tilt: float = 0.0  # > 0 raises the inner ends (sad, fear); < 0 lowers them (anger)
    brow_asym: float = 0.0
    eye_open: float = 1.0
    mouth_curv: float = 0.0  # > 0 smile, < 0 frown
    mouth_asym: float = 0.0
    mouth_stretch: float = 1.0
    jaw: float = 1.0


_MULTIPLICATIVE = frozenset(
    {"range_mult", "rate_mult", "loudness", "jitter_mult", "f1_mult", "f2_mult", "eye_open", "mouth_stretch", "jaw"}
)

_EMOTION_STYLES: dict[str, _Style] = {
    "ANG": _Style(f0_shift_st=3.5, range_mult=1.6, rate_mult=1.2, loudness=1.6, jitter_mult=1.2, tilt_delta=-0.3,
                  f1_mult=1.08, brow_raise=-0.04, brow_tilt=-0.5, eye_open=0.7, mouth_curv=-0.25, jaw=1.2),
    "DIS": _Style(f0_shift_st=-1.5, range_mult=0.8, rate_mult=0.82, loudness=0.9, jitter_mult=1.5, creak=0.35,
                  tilt_delta=0.1, brow_raise=-0.03, brow_tilt=-0.2, brow_asym=0.04, eye_open=0.65,
                  mouth_curv=-0.15, mouth_asym=0.25, mouth_stretch=0.95, jaw=0.8),
    "FEA": _Style(f0_shift_st=5.0, range_mult=1.3, rate_mult=1.25, loudness=0.95, tremor_st=0.7, jitter_mult=2.0,
                  breath_add=0.12, brow_raise=0.06, brow_tilt=0.35, eye_open=1.35, mouth_curv=-0.1,
                  mouth_stretch=1.15),
    "HAP": _Style(f0_shift_st=3.0, range_mult=1.8, rate_mult=1.1, loudness=1.2, f2_mult=1.05, brow_raise=0.02,
                  eye_open=0.75, mouth_curv=0.6, mouth_stretch=1.2),
    "NEU": _Style(range_mult=0.7),
    "SAD": _Style(f0_shift_st=-2.5, range_mult=0.45, rate_mult=0.75, loudness=0.6, tremor_st=0.15, creak=0.15,
                  tilt_delta=0.15, breath_add=0.1, f1_mult=0.95, brow_raise=0.02, brow_tilt=0.5, eye_open=0.7,
                  mouth_curv=-0.5, mouth_stretch=0.9, jaw=0.75),
}
assert set(_EMOTION_STYLES) == set(EMOTIONS)


_FACE_FIELDS = frozenset(
    {"brow_raise", "brow_tilt", "brow_asym", "eye_open", "mouth_curv", "mouth_asym", "mouth_stretch", "jaw"}
)


def _resolve_style(emotion: str, intensity: float, expression_scale: float = 1.0, prosody_scale: float = 1.0) -> _Style:
    """Interpolate from neutral to the emotion's full style (geometric for multipliers); the face's
    fields move `expression_scale` times as far, the voice's `prosody_scale` times."""
    full = _EMOTION_STYLES[emotion]
    values = {}
    for f in fields(_Style):
        v = getattr(full, f.name)
        k = intensity * (expression_scale if f.name in _FACE_FIELDS else prosody_scale)
        values[f.name] = v**k if f.name in _MULTIPLICATIVE else v * k
    return _Style(**values)


def _emotion_of(speaker_index: int, utterance_index: int) -> str:
    # Round-robin per speaker (counts differ by at most one); the speaker offset balances the
    # corpus as a whole when utterances_per_speaker is not a multiple of six.
    return EMOTIONS[(utterance_index + speaker_index) % len(EMOTIONS)]


# ---------------------------------------------------------------------------------------------
# Utterance plan: syllables, timing and prosody, shared by the bona fide clip and its spoofs


# Male reference formants F1-F3 (Hz, Peterson & Barney style) and jaw openness per vowel.
_VOWELS: dict[str, tuple[float, float, float, float]] = {
    "a": (730.0, 1090.0, 2440.0, 1.0),
    "e": (530.0, 1840.0, 2480.0, 0.75),
    "i": (270.0, 2290.0, 3010.0, 0.45),
    "o": (570.0, 840.0, 2410.0, 0.8),
    "u": (300.0, 870.0, 2240.0, 0.45),
}
_VOWEL_NAMES = tuple(_VOWELS)
_ROUNDED = frozenset({"o", "u"})


@dataclass(frozen=True)
class _Consonant:
    kind: str  # "none", "noise" (fricative), "burst" (plosive: closure then burst), "nasal"
    seconds: float
    level: float  # RMS relative to a fully stressed open vowel
    band: tuple[float, float] = (0.0, 0.0)  # Hz, for noise and bursts


_CONSONANTS: dict[str, _Consonant] = {
    "": _Consonant("none", 0.0, 0.0),
    "s": _Consonant("noise", 0.09, 0.25, (4000.0, 7500.0)),
    "sh": _Consonant("noise", 0.09, 0.25, (2000.0, 4500.0)),
    "f": _Consonant("noise", 0.07, 0.1, (1000.0, 7500.0)),
    "h": _Consonant("noise", 0.05, 0.08, (500.0, 3000.0)),
    "p": _Consonant("burst", 0.06, 0.35, (300.0, 3000.0)),
    "t": _Consonant("burst", 0.06, 0.35, (3000.0, 6500.0)),
    "k": _Consonant("burst", 0.065, 0.35, (1500.0, 3500.0)),
    "m": _Consonant("nasal", 0.07, 0.15),
    "n": _Consonant("nasal", 0.07, 0.15),
}
_ONSETS = tuple(_CONSONANTS)
_BURST_SECONDS = 0.02


@dataclass(frozen=True)
class _Syllable:
    onset: str
    vowel: str
    onset_start: int  # sample where the consonant (or its closure) starts
    nucleus_start: int
    nucleus_end: int
    amplitude: float  # planned nucleus RMS, stress times vowel openness
    accent_st: float  # pitch accent relative to the speaker's base F0
    word: int  # index of the word it belongs to


@dataclass(frozen=True)
class _Plan:
    emotion: str
    intensity: float
    style: _Style
    syllables: tuple[_Syllable, ...]  # sample indices on the extended timeline
    offset: int  # where the clip starts on the extended timeline
    num_samples: int  # clip length
    declination_st: float
    tremor_hz: float
    tremor_phase: float
    peak: float  # final audio peak: loudness of the emotion and the utterance
    snr_db: float

    def sentence(self) -> str:
        """The words with a syllable nucleus inside the clip, e.g. "kasu mi tope"."""
        words: dict[int, str] = {}
        for s in self.syllables:
            if s.nucleus_end > self.offset and s.nucleus_start < self.offset + self.num_samples:
                words[s.word] = words.get(s.word, "") + s.onset + s.vowel
        return " ".join(words.values())


# A clip is a window on speech planned over a timeline this much longer at each end: silences
# at fixed places (a lead-in, a tail) would correlate the envelopes of unrelated clips.
_CONTEXT_SECONDS = 0.3


def _plan(rng: np.random.Generator, voice: Voice, emotion: str, cfg: SynthConfig, n: int) -> _Plan:
    sr = cfg.sample_rate
    intensity = float(rng.uniform(0.5, 1.0))
    style = _resolve_style(emotion, intensity, cfg.expression_scale, cfg.prosody_scale)
    rate = voice.rate_sps * style.rate_mult
    pitch_spread = voice.f0_range_st * style.range_mult
    offset = round(_CONTEXT_SECONDS * sr)
    t = float(rng.uniform(0.0, _CONTEXT_SECONDS))
    end = (n + 2 * offset) / sr - float(rng.uniform(0.0, _CONTEXT_SECONDS))
    # clip_seconds >= 0.5 leaves room for the longest syllable (about 0.45 s), so never empty.
    syllables: list[_Syllable] = []
    full = False
    word_index = 0
    while not full:
        for j in range(int(rng.integers(1, 4))):
            onset = _ONSETS[int(rng.integers(len(_ONSETS)))]
            vowel = _VOWEL_NAMES[int(rng.integers(len(_VOWEL_NAMES)))]
            c_dur = _CONSONANTS[onset].seconds * float(rng.uniform(0.8, 1.2)) / math.sqrt(style.rate_mult)
            v_dur = max(0.08, float(rng.uniform(0.5, 0.8)) / rate)
            stress = float(rng.uniform(0.55, 0.8)) + (0.2 if j == 0 else 0.0)  # word-initial stress
            accent = float(rng.normal()) * pitch_spread + (0.5 * pitch_spread if j == 0 else 0.0)
            if t + c_dur + v_dur > end:
                full = True
                break
            a = round(t * sr)
            b = round((t + c_dur) * sr)
            syllables.append(
                _Syllable(onset, vowel, a, b, round((t + c_dur + v_dur) * sr),
                          stress * (0.55 + 0.45 * _VOWELS[vowel][3]), accent, word_index)
            )
            t += c_dur + v_dur + float(rng.uniform(0.015, 0.05)) / style.rate_mult
        word_index += 1
        t += float(rng.uniform(0.05, 0.2)) / style.rate_mult
    loudness = style.loudness * math.exp(float(rng.normal(0.0, 0.1)))
    return _Plan(
        emotion=emotion,
        intensity=intensity,
        style=style,
        syllables=tuple(syllables),
        offset=offset,
        num_samples=n,
        declination_st=float(rng.uniform(0.3, 0.8)) * pitch_spread,
        tremor_hz=float(rng.uniform(5.0, 8.0)),
        tremor_phase=float(rng.uniform(0.0, 2 * math.pi)),
        peak=float(np.clip(0.5 * loudness, 0.05, 0.95)),
        snr_db=cfg.snr_db + float(rng.uniform(-5.0, 5.0)),
    )


# ---------------------------------------------------------------------------------------------
# Audio


def _resonator_sos(freqs: list[float], bandwidths: list[float], sr: int) -> np.ndarray:
    """Cascade of Klatt two-pole resonators, unity gain at DC: sos [K, 6]."""
    sos = np.zeros((len(freqs), 6))
    for k, (f, bw) in enumerate(zip(freqs, bandwidths)):
        f = min(f, 0.45 * sr)
        c = -math.exp(-2 * math.pi * bw / sr)
        b = 2 * math.exp(-math.pi * bw / sr) * math.cos(2 * math.pi * f / sr)
        sos[k] = (1 - b - c, 0.0, 0.0, 1.0, -b, -c)
    return sos


def _vowel_sos(vowel: str, voice: Voice, style: _Style, sr: int) -> np.ndarray:
    f1, f2, f3, _ = _VOWELS[vowel]
    vt = voice.vocal_tract
    s1, s2, s3 = voice.formant_shift
    freqs = [f1 * vt * s1 * style.f1_mult, f2 * vt * s2 * style.f2_mult, f3 * vt * s3, voice.f4_hz]
    bandwidths = [bw * voice.bandwidth for bw in (60.0, 90.0, 130.0, 200.0)]
    return _resonator_sos(freqs, bandwidths, sr)


@lru_cache(maxsize=None)
def _band_sos(lo: float, hi: float, sr: int) -> np.ndarray:
    return signal.butter(4, [lo, hi], btype="bandpass", fs=sr, output="sos")


@lru_cache(maxsize=None)
def _lowpass_sos(cutoff: float, order: int, sr: int) -> np.ndarray:
    return signal.butter(order, cutoff, btype="lowpass", fs=sr, output="sos")


def _ramp_envelope(length: int, attack: int, release: int) -> np.ndarray:
    """Raised-cosine attack and release around a flat top: [length] in [0, 1]."""
    env = np.ones(length)
    attack, release = min(attack, length // 2), min(release, length // 2)
    if attack:
        env[:attack] = 0.5 - 0.5 * np.cos(np.pi * np.arange(attack) / attack)
    if release:
        env[length - release:] *= 0.5 + 0.5 * np.cos(np.pi * (np.arange(release) + 1) / release)
    return env


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x)))) if x.size else 0.0


def _render_audio(
    plan: _Plan, voice: Voice, sr: int, noise_seed: np.random.SeedSequence, flat_f0: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Synthesize the planned utterance over the extended timeline and cut the clip out of it.

    Returns, each [plan.num_samples]: audio float32 with peak `plan.peak`; articulation float64,
    the planned nucleus envelope that drives the mouth; rounding float64, 1 in rounded vowels.
    `flat_f0` replaces the F0 contour by a monotone at its mean without jitter or tremor (attack
    A02); every noise draw is the same either way, so only the prosody differs.
    """
    rng = np.random.default_rng(noise_seed)
    style = plan.style
    n = plan.num_samples + 2 * plan.offset
    # Every draw first, in a fixed order, so flat_f0 does not shift the streams.
    jitter_ctrl = rng.standard_normal(int(n / sr * 100) + 2)  # F0 wander at a 100 Hz control rate
    breath = rng.standard_normal(n)
    consonant_noise = rng.standard_normal(n)
    floor = rng.standard_normal(n)

    t = np.arange(n) / sr
    syl = plan.syllables
    centres = np.array([(s.nucleus_start + s.nucleus_end) / 2 / sr for s in syl])
    semitones = np.interp(t, centres, [s.accent_st for s in syl])
    semitones -= plan.declination_st * (t / t[-1] - 0.5)
    semitones += voice.jitter_st * style.jitter_mult * np.interp(t * 100, np.arange(jitter_ctrl.size), jitter_ctrl)
    semitones += style.tremor_st * np.sin(2 * np.pi * plan.tremor_hz * t + plan.tremor_phase)
    f0 = voice.f0_hz * 2.0 ** ((style.f0_shift_st + semitones) / 12)
    if flat_f0:
        voiced = np.concatenate([np.arange(s.nucleus_start, s.nucleus_end) for s in syl])
        f0 = np.full(n, math.exp(float(np.mean(np.log(f0[voiced])))))

    cycles = np.cumsum(f0 / sr)
    source = 1.0 - 2.0 * (cycles % 1.0)  # falling sawtooth: one sharp excitation per glottal cycle
    if style.creak:
        source *= 1.0 - style.creak * (np.floor(cycles) % 2)
    tilt = float(np.clip(voice.tilt + style.tilt_delta, 0.0, 0.95))
    source = signal.lfilter([1.0 - tilt], [1.0, -tilt], source)
    source += (voice.breathiness + style.breath_add) * _rms(source) * breath

    out = np.zeros(n)
    articulation = np.zeros(n)
    rounding = np.zeros(n)
    ring = round(0.03 * sr)  # let each resonator ring out after its nucleus
    for s in syl:
        a, b = s.nucleus_start, s.nucleus_end
        env = _ramp_envelope(b - a, round(0.025 * sr), round(0.05 * sr))
        stop = min(n, b + ring)
        x = np.zeros(stop - a)
        x[: b - a] = source[a:b] * env
        y = signal.sosfilt(_vowel_sos(s.vowel, voice, style, sr), x)
        # Scale to the planned level so the audio RMS follows the articulation the face shows.
        y *= s.amplitude * _rms(env) / max(_rms(y[: b - a]), 1e-9)
        out[a:stop] += y
        articulation[a:b] = np.maximum(articulation[a:b], s.amplitude * env)
        if s.vowel in _ROUNDED:
            rounding[a:b] = np.maximum(rounding[a:b], env)

        cons = _CONSONANTS[s.onset]
        start, stop = s.onset_start, s.nucleus_start
        if cons.kind == "burst":  # silent closure, then a fast-decaying burst
            start = max(start, stop - round(_BURST_SECONDS * sr))
        if cons.kind == "none" or stop - start < 8:
            continue
        if cons.kind == "nasal":
            f_nasal = [250.0 * voice.vocal_tract, (1000.0 if s.onset == "m" else 1500.0) * voice.vocal_tract]
            seg = signal.sosfilt(_resonator_sos(f_nasal, [80.0, 200.0], sr), source[start:stop])
        else:
            seg = signal.sosfilt(_band_sos(*cons.band, sr), consonant_noise[start:stop])
        if cons.kind == "burst":
            seg *= np.exp(-np.arange(stop - start) / (0.005 * sr))
        else:
            seg *= _ramp_envelope(stop - start, round(0.01 * sr), round(0.01 * sr))
        out[start:stop] += seg * cons.level * s.amplitude / max(_rms(seg), 1e-9)

    peak_b, peak_a = signal.iirpeak(voice.timbre_hz, 4.0, fs=sr)
    out += (10.0 ** (voice.timbre_db / 20) - 1.0) * signal.lfilter(peak_b, peak_a, out)
    speech_rms = _rms(out[articulation > 0])
    out += speech_rms * 10.0 ** (-plan.snr_db / 20) * floor
    clip = slice(plan.offset, plan.offset + plan.num_samples)
    out = out[clip] * (plan.peak / max(float(np.max(np.abs(out[clip]))), 1e-9))
    return out.astype(np.float32), articulation[clip], rounding[clip]


def _frame_bounds(num_samples: int, fps: float, sample_rate: int) -> np.ndarray:
    """Sample index where each video frame starts, plus the end: int [T + 1]."""
    num_frames = max(1, round(num_samples * fps / sample_rate))
    return np.minimum(np.round(np.arange(num_frames + 1) * sample_rate / fps).astype(np.int64), num_samples)


def _frame_means(x: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    csum = np.concatenate([[0.0], np.cumsum(x, dtype=np.float64)])
    return (csum[bounds[1:]] - csum[bounds[:-1]]) / np.maximum(np.diff(bounds), 1)


def audio_envelope(audio: np.ndarray, fps: float, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """RMS of the audio over each video frame's span of samples: [N] -> float64 [T],
    T = round(N * fps / sample_rate)."""
    audio = np.asarray(audio, dtype=np.float64)
    return np.sqrt(_frame_means(np.square(audio), _frame_bounds(audio.size, fps, sample_rate)))


# ---------------------------------------------------------------------------------------------
# Spoofing attacks: bona fide audio -> spoofed audio of the same length and peak


def _attack_vocoder(audio: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    _, _, spec = signal.stft(audio, nperseg=512, noverlap=256)
    phase = np.exp(1j * rng.uniform(0.0, 2 * np.pi, spec.shape))
    _, out = signal.istft(np.abs(spec) * phase, nperseg=512, noverlap=256)
    return _fit_length(out, audio.size)


def _attack_codec(audio: np.ndarray, sr: int, bits: int = 6, mu: float = 255.0) -> np.ndarray:
    x = signal.sosfilt(_lowpass_sos(3400.0, 8, sr), audio)
    scale = max(float(np.max(np.abs(x))), 1e-9)
    x = x / scale
    levels = 2 ** (bits - 1) - 1
    companded = np.sign(x) * np.log1p(mu * np.abs(x)) / math.log1p(mu)
    quantized = np.round(companded * levels) / levels
    return np.sign(quantized) * np.expm1(np.abs(quantized) * math.log1p(mu)) / mu * scale


def _attack_replay(audio: np.ndarray, rng: np.random.Generator, sr: int) -> np.ndarray:
    rt60 = float(rng.uniform(0.3, 0.7))
    t = np.arange(round(0.5 * sr)) / sr
    room = rng.standard_normal(t.size) * np.exp(-6.9 * t / rt60) * 0.3
    room[0] = 1.0
    x = signal.fftconvolve(audio, room)[: audio.size]
    return signal.sosfilt(_band_sos(200.0, 5000.0, sr), x)


def _fit_length(x: np.ndarray, n: int) -> np.ndarray:
    return x[:n] if x.size >= n else np.pad(x, (0, n - x.size))


def _attack_splice(
    audio: np.ndarray, plan: _Plan, donor: Voice, sr: int, noise_seed: np.random.SeedSequence,
    rng: np.random.Generator,
) -> np.ndarray:
    """The same plan (words, timing, prosody, noise) rendered in the donor's voice replaces the clip
    from a random point in its middle third on, with a 10 ms crossfade: a partial spoof, whose
    only cue is the change of voice (F0 level, formants, timbre) inside one utterance."""
    other = _render_audio(plan, donor, sr, noise_seed)[0].astype(np.float64)
    n = audio.size
    cut, fade = int(rng.integers(n // 3, 2 * n // 3)), round(0.01 * sr)
    mix = np.clip((np.arange(n) - cut) / fade, 0.0, 1.0)
    return (1.0 - mix) * audio + mix * other


def _spoof_audio(
    attack: str, audio: np.ndarray, plan: _Plan, voice: Voice, sr: int,
    noise_seed: np.random.SeedSequence, spoof_seed: np.random.SeedSequence, donor: Voice,
) -> np.ndarray:
    rng = np.random.default_rng(spoof_seed)
    if attack == "A01":
        out = _attack_vocoder(audio.astype(np.float64), rng)
    elif attack == "A02":
        return _render_audio(plan, voice, sr, noise_seed, flat_f0=True)[0]
    elif attack == "A03":
        out = _attack_codec(audio.astype(np.float64), sr)
    elif attack == "A04":
        out = _attack_replay(audio.astype(np.float64), rng, sr)
    elif attack == "A05":
        out = _attack_splice(audio.astype(np.float64), plan, donor, sr, noise_seed, rng)
    else:
        raise KeyError(f"attack {attack!r} has no implementation; known: {sorted(ATTACKS)}")
    return (out * plan.peak / max(float(np.max(np.abs(out))), 1e-9)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Video


def _render_video(
    rng: np.random.Generator, face: Face, style: _Style, opening: np.ndarray, rounding: np.ndarray,
    size: int, fps: float, swap_skin: Colour | None = None,
) -> np.ndarray:
    """Draw the talking face: opening, rounding [T] in [0, 1] -> uint8 [T, size, size, 3].

    Every part is a vectorized mask over [T, H, W]; coordinates are in units of half the image
    side, so the same face draws at any resolution. `swap_skin` draws a face swap: the inner face
    (an ellipse over eyes, nose and mouth) in that skin colour, blended into the face's own skin
    over the outer quarter of the ellipse (the seam a swap leaves); the same random draws follow,
    so head motion, lighting, blinks and pixel noise are those of the unswapped face.
    """
    num_frames = opening.size
    time = np.arange(num_frames) / fps
    half = size / 2

    def sway(amplitude: float) -> np.ndarray:  # slow head motion: two random low sinusoids
        freqs = rng.uniform(0.15, 0.7, 2)
        phases = rng.uniform(0.0, 2 * np.pi, 2)
        waves = np.sin(2 * np.pi * freqs[:, None] * time + phases[:, None])  # (2, T)
        return amplitude * (waves[0] + 0.5 * waves[1])

    cx = sway(float(rng.uniform(0.01, 0.04))) + float(rng.normal(0.0, 0.02))
    cy = sway(float(rng.uniform(0.01, 0.03))) + float(rng.normal(0.0, 0.02)) + 0.05
    zoom = float(rng.uniform(0.95, 1.05))
    lighting = float(rng.uniform(0.88, 1.12))
    eye_open = np.full(num_frames, style.eye_open)
    for start in rng.integers(0, num_frames, rng.poisson(0.3 * num_frames / fps)):
        eye_open[start : start + 3] *= np.array([0.4, 0.1, 0.4])[: num_frames - start]

    grid = (np.arange(size) + 0.5 - half) / half
    u = (grid[None, None, :] - cx[:, None, None]) / zoom  # (T, 1, W)
    v = (grid[None, :, None] - cy[:, None, None]) / zoom  # (T, H, 1)
    skin = np.asarray(face.skin)
    hair = np.asarray(face.hair)

    img = np.empty((num_frames, size, size, 3), dtype=np.float32)
    img[:] = np.asarray(face.background) * (1.05 - 0.1 * (grid + 1))[None, :, None, None]

    fw, fh = face.width, face.height
    hair_back = (u / (fw * 1.12)) ** 2 + ((v + 0.06) / (fh * 1.08)) ** 2 <= 1.0
    img[hair_back & (v < -fh + 2 * fh * face.hair_length)] = hair
    r2 = (u / fw) ** 2 + (v / fh) ** 2  # (T, H, W)
    inside = r2 <= 1.0
    face_skin = np.broadcast_to(skin, (num_frames, size, size, 3))
    if swap_skin is not None:
        inner = (u / (0.8 * fw)) ** 2 + ((v - 0.12 * fh) / (0.75 * fh)) ** 2  # (T, H, W): < 1 inside the swap
        alpha = np.clip((1.0 - inner) / 0.25, 0.0, 1.0)[..., None]  # (T, H, W, 1): 1 within, ramps over the rim
        face_skin = skin * (1.0 - alpha) + np.asarray(swap_skin) * alpha
    shaded = (1.0 - 0.18 * r2)[..., None] * face_skin  # rounder look: darker towards the edge
    img[:] = np.where(inside[..., None], shaded, img)
    img[inside & (v < -fh + face.fringe * fh)] = hair
    nose = (u / (fw * 0.08)) ** 2 + ((v - face.nose_y) / (fh * 0.1)) ** 2 <= 1.0
    img[nose] = face_skin[nose] * 0.82

    eye_ry = (face.eye_ry * eye_open)[:, None, None]
    for side in (-1.0, 1.0):
        du, dv = u - side * face.eye_dx, v - face.eye_y
        eye = (du / face.eye_rx) ** 2 + (dv / eye_ry) ** 2 <= 1.0
        img[eye] = _SCLERA
        d2 = (du / face.eye_ry) ** 2 + (dv / face.eye_ry) ** 2
        img[eye & (d2 <= 0.8)] = face.iris
        img[eye & (d2 <= 0.2)] = _PUPIL

        # Brow: a thick segment; the emotion raises it, tilts its inner end, or one brow only.
        base = face.eye_y - face.brow_gap - style.brow_raise - side * style.brow_asym
        slope = (face.brow_tilt + style.brow_tilt) * face.brow_len * 0.5
        inner = np.array([side * (face.eye_dx - face.brow_len / 2), base - slope])
        outer = np.array([side * (face.eye_dx + face.brow_len / 2), base + slope])
        seg = outer - inner
        w = np.clip(((u - inner[0]) * seg[0] + (v - inner[1]) * seg[1]) / float(seg @ seg), 0.0, 1.0)
        brow = (u - inner[0] - w * seg[0]) ** 2 + (v - inner[1] - w * seg[1]) ** 2 <= (face.brow_thick / 2) ** 2
        img[brow] = hair * 0.8

    # Mouth: a centre line bent by the curvature (> 0: corners up), a cavity whose half-height
    # follows the audio envelope, lips around it; rounded vowels narrow it.
    width = face.mouth_w * style.mouth_stretch * (1.0 - 0.2 * rounding)[:, None, None]
    xn = u / width  # (T, 1, W)
    across = np.sqrt(np.clip(1.0 - xn**2, 0.0, None))
    curv = face.mouth_curv + style.mouth_curv
    centre = face.mouth_y + curv * face.mouth_w * (1.0 / 3.0 - xn**2) + style.mouth_asym * face.mouth_w * 0.3 * xn
    cavity_half = face.mouth_open * opening[:, None, None] * across
    dv = np.abs(v - centre)  # (T, H, W)
    in_mouth = np.abs(xn) <= 1.0
    lips = in_mouth & (dv <= cavity_half + face.lip_thick * (0.4 + 0.6 * across))
    img[lips] = 0.55 * face_skin[lips] + 0.45 * _LIP_TINT
    img[in_mouth & (dv < cavity_half)] = _CAVITY

    img *= lighting
    img += 2.0 * rng.standard_normal(img.shape, dtype=np.float32)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def mouth_opening(frames: np.ndarray) -> np.ndarray:
    """Measure the mouth opening from pixels: uint8 [T, H, W, 3] -> float64 [T], the fraction
    of each frame's pixels in the mouth cavity's colour (strong red, almost no green)."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be [T, H, W, 3] RGB, got shape {frames.shape}")
    r = frames[..., 0].astype(np.int16)
    g = frames[..., 1].astype(np.int16)
    cavity = (r > 90) & (g < 45) & (r - g > 60)
    return cavity.mean(axis=(1, 2), dtype=np.float64)


# ---------------------------------------------------------------------------------------------
# Corpus


def _num_samples(cfg: SynthConfig) -> int:
    return round(cfg.clip_seconds * cfg.sample_rate)


def _is_heldout(cfg: SynthConfig, speaker_index: int) -> bool:
    return speaker_index >= cfg.num_speakers - cfg.heldout_speakers


def _spoofs_per_speaker(cfg: SynthConfig, speaker_index: int) -> int:
    fraction = cfg.spoof_fraction
    if cfg.heldout_spoof_fraction is not None and _is_heldout(cfg, speaker_index):
        fraction = cfg.heldout_spoof_fraction
    return int(math.floor(fraction * cfg.utterances_per_speaker + 0.5))


def _attacks_of(cfg: SynthConfig, speaker_index: int) -> dict[int, str]:
    """Utterance index -> attack id for one speaker's spoofed utterances."""
    count = _spoofs_per_speaker(cfg, speaker_index)
    if count == 0 or not cfg.attacks:
        return {}
    chosen = np.random.default_rng([cfg.seed, _SPOOF_STREAM, speaker_index]).permutation(cfg.utterances_per_speaker)
    # Attacks cycle over a speaker's spoofs, offset by speaker, so all of them are used.
    return {int(u): cfg.attacks[(k + speaker_index) % len(cfg.attacks)] for k, u in enumerate(chosen[:count])}


def _val_utterances(cfg: SynthConfig, speaker_index: int) -> set[int]:
    count = int(math.floor(cfg.val_fraction * cfg.utterances_per_speaker + 0.5))
    chosen = np.random.default_rng([cfg.seed, _VAL_STREAM, speaker_index]).permutation(cfg.utterances_per_speaker)
    return {int(u) for u in chosen[:count]}


def utterance_id(speaker_index: int, utterance_index: int) -> str:
    """Bona fide utterance id, e.g. "spk0003/utt0012"; a spoof appends "-A01"."""
    return f"{_speaker_id(speaker_index)}/utt{utterance_index:04d}"


def generate_utterance(
    cfg: SynthConfig, speaker_index: int, utterance_index: int, profile: SpeakerProfile | None = None
) -> list[Clip]:
    """One bona fide utterance and, when it is selected for spoofing, its spoof after it.

    Depends only on (cfg, speaker_index, utterance_index): workers can split the corpus freely.
    """
    if not 0 <= speaker_index < cfg.num_speakers or not 0 <= utterance_index < cfg.utterances_per_speaker:
        raise IndexError(f"no utterance ({speaker_index}, {utterance_index}) in this config")
    profile = profile or _speaker(cfg, speaker_index)
    sr, n = cfg.sample_rate, _num_samples(cfg)
    plan_seed, noise_seed, video_seed, spoof_seed = np.random.SeedSequence(
        [cfg.seed, _CLIP_STREAM, speaker_index, utterance_index]
    ).spawn(4)
    emotion = _emotion_of(speaker_index, utterance_index)
    plan = _plan(np.random.default_rng(plan_seed), profile.voice, emotion, cfg, n)
    audio, articulation, rounding = _render_audio(plan, profile.voice, sr, noise_seed)

    video = None
    if cfg.video:
        bounds = _frame_bounds(n, cfg.fps, sr)
        opening = np.clip(_frame_means(articulation, bounds) * plan.style.jaw, 0.0, 1.0)
        frame_rounding = _frame_means(rounding, bounds)

        def render_face(swap_skin: Colour | None = None) -> np.ndarray:  # a fresh stream: same motion and noise
            return _render_video(np.random.default_rng(video_seed), profile.face, plan.style, opening,
                                 frame_rounding, cfg.image_size, cfg.fps, swap_skin=swap_skin)

        video = render_face()

    if profile.split == "test":
        split = "test"
    else:
        split = "val" if utterance_index in _val_utterances(cfg, speaker_index) else "train"
    utt = utterance_id(speaker_index, utterance_index)
    extra = {
        "sentence": plan.sentence(),
        "intensity": round(plan.intensity, 4),
        "sex": profile.sex,
    }
    meta = Meta(
        dataset="synth", speaker=profile.id, utterance=utt, duration=n / sr, emotion=emotion,
        fps=float(cfg.fps) if cfg.video else None, split=split, extra=extra,
    )
    clips = [Clip(meta=meta, audio=audio, video=video)]

    attack = _attacks_of(cfg, speaker_index).get(utterance_index)
    if attack is not None:
        # The donor of a swapped face and a spliced voice (A05): another speaker, chosen by
        # utterance so that a target gets several.
        source = (speaker_index + 1 + utterance_index % max(cfg.num_speakers - 1, 1)) % cfg.num_speakers
        donor = _speaker(cfg, source)
        spoofed = _spoof_audio(attack, audio, plan, profile.voice, sr, noise_seed, spoof_seed, donor.voice)
        spoof_extra = {**extra, "bonafide_of": utt}
        if attack == "A05":
            spoof_extra["voice_source"] = donor.id
        spoof_video = video
        if video is not None and cfg.spoof_video == "faceswap":
            spoof_extra["face_source"] = donor.id
            spoof_video = render_face(donor.face.skin)
        spoof_meta = replace(meta, utterance=f"{utt}-{attack}", spoof="spoof", attack=attack, extra=spoof_extra)
        clips.append(Clip(meta=spoof_meta, audio=spoofed, video=spoof_video))
    return clips


def generate(cfg: SynthConfig) -> Iterator[Clip]:
    """Every clip, speaker by speaker, utterance by utterance, each spoof right after its bona
    fide clip; the same config gives bit-identical clips."""
    for profile in speakers(cfg):
        for u in range(cfg.utterances_per_speaker):
            yield from generate_utterance(cfg, profile.index, u, profile)


def num_clips(cfg: SynthConfig) -> int:
    """Exactly how many clips `generate(cfg)` yields."""
    return sum(cfg.utterances_per_speaker + _spoofs_per_speaker(cfg, s) for s in range(cfg.num_speakers))


# ---------------------------------------------------------------------------------------------
# Verification trials


def trials(cfg: SynthConfig) -> list[tuple[int, str, str]]:
    """Speaker-verification trials over the held-out speakers' bona fide utterances.

    Each held-out speaker enrolls `trials_per_speaker` trials (at most twice its number of
    distinct utterance pairs), alternating target (another of its utterances, distinct unordered
    pairs) and non-target (an utterance of another held-out speaker, distinct pairs). Entries are
    `(label, "spk0003/utt0012.wav", "spk0005/utt0001.wav")` as in VoxCeleb's list; drop the
    ".wav" to get the utterance id.
    """
    rng = np.random.default_rng([cfg.seed, _TRIAL_STREAM])
    num_utts = cfg.utterances_per_speaker
    held = list(range(cfg.num_speakers - cfg.heldout_speakers, cfg.num_speakers))
    pairs = np.array([(i, j) for i in range(num_utts) for j in range(i + 1, num_utts)])
    half = min(cfg.trials_per_speaker // 2, len(pairs))  # target pairs are distinct
    out: list[tuple[int, str, str]] = []
    for spk in held:
        targets = pairs[rng.choice(len(pairs), size=half, replace=False)]
        flip = rng.random(half) < 0.5  # random enroll/test order within each target pair
        others = [o for o in held if o != spk]
        impostor = rng.choice(num_utts * len(others) * num_utts, size=half, replace=False)
        for k in range(half):
            i, j = (targets[k][::-1] if flip[k] else targets[k])
            out.append((1, utterance_id(spk, int(i)) + ".wav", utterance_id(spk, int(j)) + ".wav"))
            enroll, rest = divmod(int(impostor[k]), len(others) * num_utts)
            other, test = divmod(rest, num_utts)
            out.append((0, utterance_id(spk, enroll) + ".wav", utterance_id(others[other], test) + ".wav"))
    return out


def format_trials(trial_list: list[tuple[int, str, str]]) -> str:
    """VoxCeleb trial-list text: one `<1|0> <enroll> <test>` line per trial."""
    return "".join(f"{label} {enroll} {test}\n" for label, enroll, test in trial_list)
