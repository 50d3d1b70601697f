"""The synthetic corpus: determinism, labels and splits, trials, audio-visual sync, identity,
emotion and spoof cues, and config validation. Small configs keep the whole file to seconds."""

from __future__ import annotations

import re
from collections import Counter, defaultdict

import numpy as np
import pytest

from avssl.config import ConfigError, validate
from avssl.data.schema import EMOTIONS, SAMPLE_RATE
from avssl.data.synth import (
    ATTACKS,
    SynthConfig,
    audio_envelope,
    format_trials,
    generate,
    generate_utterance,
    mouth_opening,
    num_clips,
    speakers,
    trials,
)

SMALL = dict(
    seed=7, num_speakers=6, utterances_per_speaker=6, clip_seconds=1.0, image_size=32,
    heldout_speakers=2, spoof_fraction=0.5, trials_per_speaker=10,
)


@pytest.fixture(scope="module")
def small_cfg() -> SynthConfig:
    return SynthConfig(**SMALL)


@pytest.fixture(scope="module")
def clips(small_cfg):
    return list(generate(small_cfg))


@pytest.fixture(scope="module")
def bonafide(clips):
    return [c for c in clips if c.meta.spoof == "bonafide"]


def _frames(audio: np.ndarray, size: int = 640, hop: int = 320) -> np.ndarray:
    starts = np.arange(0, audio.size - size + 1, hop)
    return audio[starts[:, None] + np.arange(size)].astype(np.float64)  # (F, size)


def _pitch_track(audio: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Autocorrelation F0 (Hz) and periodicity (peak normalized autocorrelation) of the loud frames."""
    frames = _frames(audio)
    rms = np.sqrt((frames**2).mean(1))
    frames = frames[rms > 0.3 * rms.max()]
    frames = frames - frames.mean(1, keepdims=True)
    spec = np.fft.rfft(frames * np.hanning(frames.shape[1]), n=2 * frames.shape[1])
    ac = np.fft.irfft(np.abs(spec) ** 2)[:, : frames.shape[1]]
    lo, hi = SAMPLE_RATE // 400, SAMPLE_RATE // 60
    lag = lo + np.argmax(ac[:, lo:hi], axis=1)
    return SAMPLE_RATE / lag, ac[np.arange(len(lag)), lag] / ac[:, 0]


def _log_f0(audio: np.ndarray) -> float:
    return float(np.median(np.log2(_pitch_track(audio)[0])))


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a, b)[0, 1])


# --- determinism -----------------------------------------------------------------------------


def test_same_seed_is_bit_identical_and_other_seed_differs(small_cfg, clips):
    """The same seed regenerates identical audio, video and metadata; another seed changes them."""
    again = [c for _, c in zip(range(5), generate(SynthConfig(**SMALL)))]
    for a, b in zip(clips[:5], again):
        assert a.meta == b.meta
        assert np.array_equal(a.audio, b.audio) and np.array_equal(a.video, b.video)
    other = next(iter(generate(SynthConfig(**{**SMALL, "seed": 8}))))
    assert other.audio.shape == clips[0].audio.shape
    assert not np.array_equal(other.audio, clips[0].audio)
    assert not np.array_equal(other.video, clips[0].video)


def test_clip_depends_only_on_speaker_and_utterance(small_cfg, clips):
    """An utterance generated on its own equals the one generate() yields, so workers can split the corpus."""
    wanted = clips[-1].meta.extra.get("bonafide_of", clips[-1].meta.utterance)
    spk, utt = (int(x[3:]) for x in wanted.split("/"))
    alone = generate_utterance(small_cfg, spk, utt)
    in_corpus = [c for c in clips if c.meta.utterance.startswith(wanted)]
    assert [c.meta for c in alone] == [c.meta for c in in_corpus]
    for a, b in zip(alone, in_corpus):
        assert np.array_equal(a.audio, b.audio) and np.array_equal(a.video, b.video)


# --- shapes, counts, labels, splits ----------------------------------------------------------


def test_num_clips_matches_generate(small_cfg, clips):
    """num_clips is the exact count generate() yields, with the schema's shapes."""
    assert len(clips) == num_clips(small_cfg) == 6 * 6 + 6 * 3
    frames = round(small_cfg.clip_seconds * small_cfg.fps)
    for c in clips:
        assert c.audio.dtype == np.float32 and c.audio.shape == (SAMPLE_RATE,)
        assert 0.0 < np.abs(c.audio).max() <= 1.0
        assert c.video.dtype == np.uint8 and c.video.shape == (frames, 32, 32, 3)
        assert c.meta.dataset == "synth" and c.meta.duration == 1.0 and c.meta.fps == 25.0
    audio_only = next(iter(generate(SynthConfig(**{**SMALL, "video": False}))))
    assert audio_only.video is None and audio_only.meta.fps is None
    assert np.array_equal(audio_only.audio, clips[0].audio)


def test_emotions_balanced_per_speaker(bonafide):
    """Every speaker has all six emotions and its emotion counts differ by at most one."""
    per_speaker = defaultdict(Counter)
    for c in bonafide:
        per_speaker[c.meta.speaker][c.meta.emotion] += 1
    assert len(per_speaker) == 6
    for counts in per_speaker.values():
        assert set(counts) == set(EMOTIONS)
        assert max(counts.values()) - min(counts.values()) <= 1
    uneven = [c for c in generate(SynthConfig(**{**SMALL, "num_speakers": 3, "heldout_speakers": 2,
                                                 "utterances_per_speaker": 8, "video": False}))
              if c.meta.spoof == "bonafide" and c.meta.speaker == "spk0001"]
    counts = Counter(c.meta.emotion for c in uneven)
    assert set(counts) == set(EMOTIONS) and max(counts.values()) - min(counts.values()) <= 1


def test_spoofs_follow_fraction_use_every_attack_and_keep_labels(small_cfg, clips):
    """Spoofs are the configured fraction, use every attack, and copy their bona fide labels and video."""
    by_id = {c.meta.utterance: c for c in clips}
    spoofs = [c for c in clips if c.meta.spoof == "spoof"]
    bona = len(clips) - len(spoofs)
    assert abs(len(spoofs) / bona - small_cfg.spoof_fraction) <= 0.5 / small_cfg.utterances_per_speaker
    assert {c.meta.attack for c in spoofs} == set(small_cfg.attacks)
    for c in spoofs:
        source = by_id[c.meta.extra["bonafide_of"]]
        assert c.meta.utterance == f"{source.meta.utterance}-{c.meta.attack}"
        for field in ("speaker", "emotion", "split", "duration", "fps"):
            assert getattr(c.meta, field) == getattr(source.meta, field)
        assert c.video is source.video
        assert not np.array_equal(c.audio, source.audio)
    assert all(c.meta.attack == "-" for c in clips if c.meta.spoof == "bonafide")


def test_heldout_spoof_fraction_sets_the_test_splits_share_alone():
    """`heldout_spoof_fraction` spoofs the held-out speakers' clips at its own rate; train speakers
    keep `spoof_fraction`, and `num_clips` counts both."""
    cfg = SynthConfig(**{**SMALL, "spoof_fraction": 0.0, "heldout_spoof_fraction": 1.0, "video": False})
    clips = list(generate(cfg))
    assert len(clips) == num_clips(cfg) == 6 * 6 + 2 * 6
    spoofs = Counter(c.meta.split for c in clips if c.meta.spoof == "spoof")
    assert spoofs == {"test": 2 * 6}
    assert {c.meta.attack for c in clips if c.meta.spoof == "spoof"} == set(cfg.attacks)
    unset = SynthConfig(**{**SMALL, "video": False})
    assert num_clips(unset) == 6 * 6 + 6 * 3  # unset: every speaker at spoof_fraction 0.5


def test_heldout_speakers_only_in_test_split(small_cfg, clips):
    """Held-out speakers are exactly the test split; train speakers appear only in train and val."""
    profiles = speakers(small_cfg)
    held = {p.id for p in profiles if p.split == "test"}
    assert len(held) == small_cfg.heldout_speakers
    for c in clips:
        assert (c.meta.split == "test") == (c.meta.speaker in held)
    splits = Counter(c.meta.split for c in clips if c.meta.spoof == "bonafide")
    assert splits["val"] == 4 * 1 and splits["train"] == 4 * 5  # round(0.1 * 6) = 1 val utterance per train speaker
    assert re.fullmatch(r"spk\d{4}/utt\d{4}", clips[0].meta.utterance)


def test_trials_balanced_heldout_only_and_voxceleb_formatted(small_cfg, clips):
    """Trials are balanced, deterministic, only over held-out bona fide utterances, in VoxCeleb's format."""
    trial_list = trials(small_cfg)
    assert trial_list == trials(SynthConfig(**SMALL))
    labels = Counter(label for label, _, _ in trial_list)
    assert labels[1] == labels[0] == small_cfg.heldout_speakers * small_cfg.trials_per_speaker // 2
    test_utts = {c.meta.utterance for c in clips if c.meta.split == "test" and c.meta.spoof == "bonafide"}
    spk_of = {c.meta.utterance: c.meta.speaker for c in clips}
    for label, enroll, test in trial_list:
        e, t = enroll.removesuffix(".wav"), test.removesuffix(".wav")
        assert e in test_utts and t in test_utts and e != t
        assert label == int(spk_of[e] == spk_of[t])
    assert len(set(trial_list)) == len(trial_list)
    lines = format_trials(trial_list).splitlines()
    assert len(lines) == len(trial_list)
    assert all(re.fullmatch(r"[01] spk\d{4}/utt\d{4}\.wav spk\d{4}/utt\d{4}\.wav", line) for line in lines)


# --- what a model can learn from it ----------------------------------------------------------


def test_mouth_follows_audio_and_not_other_clips(bonafide):
    """Mouth opening measured from pixels tracks the clip's own audio envelope, not another clip's."""
    mouths = [mouth_opening(c.video) for c in bonafide[:12]]
    envelopes = [audio_envelope(c.audio, c.meta.fps) for c in bonafide[:12]]
    matched = [_corr(m, e) for m, e in zip(mouths, envelopes)]
    shuffled = [_corr(m, e) for i, m in enumerate(mouths) for j, e in enumerate(envelopes) if i != j]
    assert min(matched) > 0.5, matched
    assert abs(np.mean(shuffled)) < 0.1, np.mean(shuffled)


def test_speakers_distinguishable_by_voice_and_face(bonafide):
    """Emotion-centred pitch varies more between speakers than within one; face chromaticity identifies them."""
    cfg = SynthConfig(**{**SMALL, "num_speakers": 12, "spoof_fraction": 0.0, "video": False})
    measured = [(c.meta.speaker, c.meta.emotion, _log_f0(c.audio)) for c in generate(cfg)]
    emotion_mean = {e: np.mean([f for _, em, f in measured if em == e]) for e in EMOTIONS}
    f0 = defaultdict(list)
    for spk, emotion, f in measured:  # emotions shift pitch by design: compare speakers net of that
        f0[spk].append(f - emotion_mean[emotion])
    within = np.mean([np.var(v) for v in f0.values()])
    between = np.var([np.mean(v) for v in f0.values()])
    assert between > 2 * within, (between, within)

    colours = defaultdict(list)
    for c in bonafide:
        mean = c.video.reshape(-1, 3).mean(0)
        colours[c.meta.speaker].append(mean / mean.sum())  # chromaticity: lighting changes per clip

    ids = list(colours)
    hits = 0
    for spk in ids:  # leave-one-out nearest centroid
        for k, x in enumerate(colours[spk]):
            centroids = [np.mean([y for j, y in enumerate(colours[s]) if s != spk or j != k], 0) for s in ids]
            hits += ids[int(np.argmin([np.linalg.norm(x - m) for m in centroids]))] == spk
    assert hits / sum(len(v) for v in colours.values()) >= 0.8  # chance is 1/6


def test_anger_is_higher_and_louder_than_sadness(bonafide):
    """Per speaker, the angry clip has a higher pitch and more energy than the sad one (median over speakers)."""
    per_speaker = defaultdict(dict)
    for c in bonafide:
        per_speaker[c.meta.speaker][c.meta.emotion] = c.audio
    pitch_gap = [12 * (_log_f0(e["ANG"]) - _log_f0(e["SAD"])) for e in per_speaker.values()]
    rms_ratio = [np.sqrt(np.mean(e["ANG"] ** 2) / np.mean(e["SAD"] ** 2)) for e in per_speaker.values()]
    assert np.median(pitch_gap) > 2.0, pitch_gap  # semitones; the median shrugs off an octave error
    assert np.median(rms_ratio) > 1.5, rms_ratio


def test_each_attack_leaves_its_artefact():
    """A01 lowers periodicity, A02 flattens the pitch contour, A03 cuts 4-8 kHz and quantizes to 6 bits."""
    cfg = SynthConfig(**{**SMALL, "num_speakers": 3, "heldout_speakers": 2, "spoof_fraction": 1.0, "video": False})
    by_id = {}
    seen = defaultdict(list)
    for c in generate(cfg):
        by_id[c.meta.utterance] = c.audio
        if c.meta.spoof == "spoof":
            seen[c.meta.attack].append((by_id[c.meta.extra["bonafide_of"]], c.audio))

    def periodicity(x):
        return float(np.median(_pitch_track(x)[1]))

    def pitch_spread(x):  # interquartile range in semitones: robust to the odd octave error
        return float(np.subtract(*np.percentile(12 * np.log2(_pitch_track(x)[0]), [75, 25])))

    def high_band(x):
        power = np.abs(np.fft.rfft(x)) ** 2
        return float(power[len(power) // 2 :].sum() / power.sum())

    assert set(seen) == {"A01", "A02", "A03"}
    drops = [periodicity(b) - periodicity(s) for b, s in seen["A01"]]
    assert min(drops) > 0.05 and np.median(drops) > 0.15, drops
    flat, natural = (np.median([pitch_spread(pair[k]) for pair in seen["A02"]]) for k in (1, 0))
    assert flat < 0.25 * natural, (flat, natural)
    assert all(high_band(s) < 0.005 and len(np.unique(s)) <= 2**6 for _, s in seen["A03"])
    assert max(high_band(b) for b, _ in seen["A03"]) > 0.005 and len(np.unique(seen["A03"][0][0])) > 2**6


def test_partial_spoof_switches_voice_once_in_the_middle_third():
    """A05 keeps the bona fide clip (up to a gain) before its cut in the middle third and is another
    speaker's rendering of the same words after it; the donor is recorded and is not the speaker."""
    cfg = SynthConfig(**{**SMALL, "num_speakers": 3, "heldout_speakers": 2, "spoof_fraction": 1.0,
                         "attacks": ["A05"], "video": False})
    by_id, pairs = {}, []
    for c in generate(cfg):
        by_id[c.meta.utterance] = c
        if c.meta.spoof == "spoof":
            pairs.append((by_id[c.meta.extra["bonafide_of"]], c))
    assert pairs and all(s.meta.attack == "A05" for _, s in pairs)
    for bona, spoof in pairs:
        assert spoof.meta.extra["voice_source"] != bona.meta.speaker
        n = bona.audio.size
        head, tail = slice(0, n // 3), slice(2 * n // 3 + 200, n)  # 200 samples: past the 10 ms crossfade
        assert np.corrcoef(bona.audio[head], spoof.audio[head])[0, 1] > 0.999
        assert abs(np.corrcoef(bona.audio[tail], spoof.audio[tail])[0, 1]) < 0.9


# --- config validation -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bad", "key"),
    [
        ({"num_speakers": 0}, "num_speakers"),
        ({"num_speakers": 6, "heldout_speakers": 6}, "heldout_speakers"),
        ({"utterances_per_speaker": 5}, "utterances_per_speaker"),
        ({"clip_seconds": 0.0}, "clip_seconds"),
        ({"sample_rate": 8000}, "sample_rate"),
        ({"attacks": ["A09"]}, "A09"),
        ({"attacks": ["A01", "A01"]}, "twice"),
        ({"heldout_spoof_fraction": 1.5}, "heldout_spoof_fraction"),
        ({"spoof_fraction": 0.0, "heldout_spoof_fraction": 0.5, "attacks": []}, "attack"),
        ({"spoof_fraction": 0.2, "attacks": []}, "attack"),
        ({"trials_per_speaker": 7}, "trials_per_speaker"),
        ({"num_speakers": "24"}, "num_speakers"),
        ({"speakers": 24}, "unknown key"),
    ],
)
def test_bad_config_raises_at_load(bad, key):
    """Impossible, inconsistent, mistyped or unknown config values are ConfigErrors that name the problem."""
    with pytest.raises(ConfigError, match=key):
        validate(SynthConfig, bad)


def test_defaults_and_every_known_attack_validate():
    """The documented defaults validate, and every attack in ATTACKS is accepted."""
    cfg = validate(SynthConfig, {"attacks": sorted(ATTACKS)})
    assert cfg.num_speakers > cfg.heldout_speakers and cfg.sample_rate == SAMPLE_RATE
    clip = generate_utterance(validate(SynthConfig, {"attacks": ["A04"], "spoof_fraction": 1.0, "video": False}), 0, 0)
    assert [c.meta.attack for c in clip] == ["-", "A04"]


def test_faceswap_spoofs_change_only_the_inner_face():
    """With spoof_video="faceswap" a spoof's frames are its bona fide face with another speaker's
    inner face: same background and head motion, same mouth movement, different skin inside."""
    cfg = SynthConfig(**{**SMALL, "spoof_video": "faceswap", "image_size": 48})
    profiles = speakers(cfg)
    found = 0
    for u in range(cfg.utterances_per_speaker):
        pair = generate_utterance(cfg, 1, u)
        if len(pair) < 2:
            continue
        bona, spoof = pair
        found += 1
        source = spoof.meta.extra["face_source"]
        assert source != bona.meta.speaker and source in {p.id for p in profiles}
        assert spoof.video is not bona.video and spoof.video.shape == bona.video.shape
        diff = np.abs(spoof.video.astype(int) - bona.video.astype(int)).max(-1)  # (T, H, W)
        assert (diff[:, :3, :] == 0).all() and (diff[:, :, :3] == 0).all()  # background untouched
        centre = diff[:, 20:30, 18:30]  # cheeks and nose of the 48x48 face
        skins = np.abs(np.subtract(profiles[int(source[3:])].face.skin, profiles[1].face.skin)).max()
        assert centre.mean() > 0.3 * skins
        np.testing.assert_allclose(mouth_opening(spoof.video), mouth_opening(bona.video), atol=2e-3)
    assert found >= 2
    default = generate_utterance(SynthConfig(**SMALL), 1, 0)
    assert len(default) < 2 or default[1].video is default[0].video


def test_expression_scale_moves_the_face_and_leaves_the_voice():
    """expression_scale moves an emotional face further from its neutral rendering (0) the larger it is, leaves the
    audio alone, and leaves a neutral clip's frames unchanged."""
    by_emotion = {}
    for u in range(SMALL["utterances_per_speaker"]):
        by_emotion[generate_utterance(SynthConfig(**SMALL), 1, u)[0].meta.emotion] = u

    def render(u: int, scale: float):
        return generate_utterance(SynthConfig(**{**SMALL, "expression_scale": scale}), 1, u)[0]

    for emotion in ("ANG", "HAP", "SAD"):
        neutral_face, default, strong = (render(by_emotion[emotion], s) for s in (0.0, 1.0, 2.5))
        np.testing.assert_array_equal(default.audio, strong.audio)
        gap = [np.abs(c.video.astype(int) - neutral_face.video.astype(int)).mean() for c in (default, strong)]
        assert 0 < gap[0] < gap[1], (emotion, gap)
    neu = by_emotion["NEU"]
    np.testing.assert_array_equal(render(neu, 1.0).video, render(neu, 2.5).video)


def test_prosody_scale_moves_the_voice():
    """prosody_scale moves the voice further from neutral the larger it is: an angry clip gets louder, a sad one quieter."""
    by_emotion = {}
    for u in range(SMALL["utterances_per_speaker"]):
        by_emotion[generate_utterance(SynthConfig(**SMALL), 1, u)[0].meta.emotion] = u

    def rms(emotion: str, scale: float) -> float:
        clip = generate_utterance(SynthConfig(**{**SMALL, "prosody_scale": scale}), 1, by_emotion[emotion])[0]
        return float(np.sqrt(np.mean(clip.audio.astype(np.float64) ** 2)))

    assert rms("ANG", 0.0) < rms("ANG", 1.0) < rms("ANG", 2.0)
    assert rms("SAD", 0.0) > rms("SAD", 1.0) > rms("SAD", 2.0)
