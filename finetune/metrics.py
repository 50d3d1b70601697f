"""Evaluation metrics for speaker verification, spoof detection and emotion recognition.

Every function says which variant it implements, since published numbers differ by variant:

- Binary trials (verification, spoof detection): `labels` 1 = target / bona fide, 0 = non-target /
  spoof; a higher score means "more target / more bona fide"; a trial is accepted when
  `score >= threshold`. FAR (P_fa) = accepted non-targets / non-targets, FRR (P_miss) = rejected
  targets / targets. Operating points are taken at every distinct score (ties move together) plus
  one threshold above every score (reject all), so the curve runs from (FAR 1, FRR 0) to
  (FAR 0, FRR 1). Rates are fractions (0.0083), not percentages.
- `eer`: WeSpeaker-style EER, the FAR = FRR crossing linearly interpolated between the two
  operating points around it. `eer_asvspoof`: the ASVspoof package's, the operating point that
  minimizes |FRR - FAR| and the mean of the two there. Both agree to O(1/trials).
- `min_dcf`: NIST-style detection cost normalized by the cost of the best trivial system,
  min(C_miss * P_tar, C_fa * (1 - P_tar)) (SpeechBrain's is unnormalized: 100x apart at 0.01).
- `tdcf_2019`: the legacy ASVspoof 2019 tandem DCF (all 2019 LA papers); `tdcf_2021`: the revised
  ASVspoof 2021 form with C0, C1, C2. Both put the ASV threshold at the ASV EER point as the
  ASVspoof packages do.
- Classification: WA = accuracy; UA = mean per-class recall over the classes present in
  `y_true` (= scikit-learn's `balanced_accuracy_score`); macro / weighted F1 over the classes
  present in `y_true` or `y_pred` (scikit-learn's default labels); CCC is Lin's concordance
  correlation with population (1/N) moments.
- Comparing two systems on one test set: `paired_bootstrap`, a paired cluster bootstrap of any
  difference of these metrics (clusters = speakers), giving its standard error and 95 % interval.

Classification metrics are scikit-learn's, on inputs validated here (imported where used: `avssl
verify` and `embed` load this module without needing them); the binary-trial metrics and the
bootstrap are numpy (each section says why no library serves).

Inputs are array-likes; bad input (empty, lengths that differ, NaN or inf scores, one class where
both are needed) raises ValueError saying what is wrong.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

ASV_LABELS: tuple[str, ...] = ("target", "nontarget", "spoof")

# ----------------------------------------------------------------------------- validation


def _binary_inputs(scores: Any, labels: Any, what: str = "scores") -> tuple[np.ndarray, np.ndarray]:
    """-> (float64 scores [N], bool labels [N]); both classes required."""
    if np.ndim(scores) > 1 or np.ndim(labels) > 1:
        raise ValueError(f"{what} and labels must be 1-D, got shapes {np.shape(scores)} and {np.shape(labels)}")
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    lab = np.asarray(labels).reshape(-1)
    if s.size == 0:
        raise ValueError(f"{what} are empty: need at least one target and one non-target trial")
    if s.size != lab.size:
        raise ValueError(f"{what} and labels differ in length: {s.size} vs {lab.size}")
    bad = ~np.isfinite(s)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{what} contain {int(bad.sum())} NaN/inf values (first at index {i}: {s[i]})")
    if lab.dtype == bool:
        y = lab
    else:
        try:
            num = lab.astype(np.float64)
        except (TypeError, ValueError):
            raise ValueError(f"labels must be 0/1 (1 = target / bona fide), got values like {lab[:3].tolist()}") from None
        if not np.isin(num, (0.0, 1.0)).all():
            odd = sorted(set(np.unique(num[~np.isin(num, (0.0, 1.0))]).tolist()))[:5]
            raise ValueError(f"labels must be 0/1 (1 = target / bona fide), found {odd}")
        y = num == 1.0
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.size:
        only = "target / bona fide (1)" if n_pos else "non-target / spoof (0)"
        raise ValueError(f"labels hold only {only} trials: this metric needs both classes")
    return s, y


def _class_inputs(y_true: Any, y_pred: Any, num_classes: int | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """-> (int64 y_true [N], int64 y_pred [N], num_classes) with labels in [0, num_classes)."""
    t, p = np.asarray(y_true).reshape(-1), np.asarray(y_pred).reshape(-1)
    if t.size == 0:
        raise ValueError("y_true is empty")
    if t.size != p.size:
        raise ValueError(f"y_true and y_pred differ in length: {t.size} vs {p.size}")
    for name, a in (("y_true", t), ("y_pred", p)):
        if not (np.issubdtype(a.dtype, np.integer) or a.dtype == bool):
            raise ValueError(f"{name} must hold integer class indices, got dtype {a.dtype}")
        if (a < 0).any():
            raise ValueError(f"{name} holds negative class indices")
    t, p = t.astype(np.int64), p.astype(np.int64)
    top = int(max(t.max(), p.max())) + 1
    if num_classes is None:
        num_classes = top
    elif top > num_classes:
        raise ValueError(f"class index {top - 1} is out of range for num_classes={num_classes}")
    return t, p, num_classes


# ----------------------------------------------------------------------------- binary trials
# Written out: scikit-learn has no EER, minDCF or t-DCF, and its det_curve drops the accept-all
# and reject-all ends that minDCF and t-DCF must weigh.


def det_curve(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Operating points of a binary detector: (far [K], frr [K], thresholds [K]), thresholds ascending.

    Point k accepts trials with `score >= thresholds[k]`. thresholds are the distinct scores then
    +inf, so far falls from 1 to 0 and frr rises from 0 to 1 (for DET / ROC plots).
    """
    s, y = _binary_inputs(scores, labels)
    tar, non = np.sort(s[y]), np.sort(s[~y])
    thr = np.append(np.unique(s), np.inf)
    frr = np.searchsorted(tar, thr, side="left") / tar.size  # targets strictly below the threshold
    far = 1.0 - np.searchsorted(non, thr, side="left") / non.size  # non-targets at or above it
    return far, frr, thr


@dataclass(frozen=True)
class EERResult:
    eer: float  # fraction, not percent
    threshold: float


def eer(scores: Any, labels: Any) -> EERResult:
    """Equal error rate, WeSpeaker style: FAR and FRR are linear between the two operating points
    that straddle FAR = FRR, and the EER is where the two lines cross. The threshold is
    interpolated between those points' thresholds in the same proportion (the lower one if the
    upper is +inf)."""
    far, frr, thr = det_curve(scores, labels)
    d = frr - far  # strictly increasing from -1 to 1: each step rejects more targets or fewer non-targets
    j = int(np.argmax(d >= 0))
    if d[j] == 0:
        return EERResult(float(frr[j]), float(thr[j]))
    i = j - 1  # d[0] = -1, so j >= 1
    alpha = -d[i] / (d[j] - d[i])
    rate = frr[i] + alpha * (frr[j] - frr[i])
    threshold = thr[i] + alpha * (thr[j] - thr[i]) if np.isfinite(thr[j]) else thr[i]
    return EERResult(float(rate), float(threshold))


def per_attack_eer(scores: Any, labels: Any, attacks: Sequence[str]) -> dict[str, float]:
    """EER (`eer`) of all bona fide samples (label 1) against each attack's spoofs alone (label 0,
    grouped by `attacks`, the attack id of every sample; bona fide ones are ignored):
    {attack id: EER}, as ASVspoof's per-attack breakdown. Empty unless both classes are present."""
    if len(np.unique(np.asarray(labels).reshape(-1))) < 2:
        return {}
    s, bona = _binary_inputs(scores, labels)
    groups = np.asarray(attacks).astype(str).reshape(-1)
    if groups.shape != s.shape:
        raise ValueError(f"attacks has {groups.size} entries for {s.size} scores")
    out = {}
    for a in sorted(set(groups[~bona].tolist())):
        spoof = ~bona & (groups == a)
        out[str(a)] = eer(np.concatenate([s[bona], s[spoof]]),
                          np.concatenate([np.ones(int(bona.sum())), np.zeros(int(spoof.sum()))])).eer
    return out


def eer_asvspoof(scores: Any, labels: Any) -> EERResult:
    """EER as the ASVspoof evaluation package computes it: the operating point minimizing
    |FRR - FAR|, reporting (FRR + FAR) / 2 there and its threshold. (The package walks the
    sorted scores one trial at a time, so tied scores may split; here ties move together.
    Identical when scores are distinct.)"""
    far, frr, thr = det_curve(scores, labels)
    k = int(np.argmin(np.abs(frr - far)))
    return EERResult(float((frr[k] + far[k]) / 2), float(thr[k]))


def min_dcf(scores: Any, labels: Any, p_target: float, c_miss: float = 1.0, c_fa: float = 1.0) -> tuple[float, float]:
    """Normalized minimum detection cost -> (value, threshold):

    min over t of (c_miss * P_miss(t) * p_target + c_fa * P_fa(t) * (1 - p_target))
                  / min(c_miss * p_target, c_fa * (1 - p_target)).
    1.0 is the cost of always accepting or always rejecting, whichever is cheaper. The threshold
    is +inf when rejecting everything is best.
    """
    if not 0.0 < p_target < 1.0:
        raise ValueError(f"p_target must be in (0, 1), got {p_target}")
    if c_miss <= 0 or c_fa <= 0:
        raise ValueError(f"costs must be positive, got c_miss={c_miss}, c_fa={c_fa}")
    far, frr, thr = det_curve(scores, labels)
    cost = c_miss * frr * p_target + c_fa * far * (1.0 - p_target)
    k = int(np.argmin(cost))
    return float(cost[k] / min(c_miss * p_target, c_fa * (1.0 - p_target))), float(thr[k])


def min_dcf_001(scores: Any, labels: Any) -> float:
    """Normalized minDCF at P_tar = 0.01, C_miss = C_fa = 1 (VoxCeleb / WeSpeaker reports)."""
    return min_dcf(scores, labels, 0.01)[0]


def min_dcf_005(scores: Any, labels: Any) -> float:
    """Normalized minDCF at P_tar = 0.05, C_miss = C_fa = 1 (VoxSRC reports)."""
    return min_dcf(scores, labels, 0.05)[0]


def binary_report(scores: Any, labels: Any) -> dict[str, float | int]:
    """EER (both variants) and normalized minDCF at P_tar 0.01 and 0.05, as JSON-ready floats."""
    s, y = _binary_inputs(scores, labels)
    e = eer(s, y)
    return {
        "eer": e.eer,
        "eer_threshold": e.threshold,
        "eer_asvspoof": eer_asvspoof(s, y).eer,
        "min_dcf_0.01": min_dcf(s, y, 0.01)[0],
        "min_dcf_0.05": min_dcf(s, y, 0.05)[0],
        "num_target": int(y.sum()),
        "num_nontarget": int((~y).sum()),
    }


# ----------------------------------------------------------------------------- tandem DCF


@dataclass(frozen=True)
class ASVRates:
    """ASV error rates at its EER threshold (accept if score >= threshold)."""

    threshold: float
    p_miss: float  # targets rejected
    p_fa: float  # non-targets accepted
    p_miss_spoof: float  # spoofs rejected (1 - P_fa_spoof)


def asv_error_rates(asv_scores: Any, asv_labels: Sequence[str]) -> ASVRates:
    """ASV operating point for t-DCF: the ASVspoof packages' EER threshold on target vs non-target
    trials (minimum |FRR - FAR|, `eer_asvspoof`), and P_miss, P_fa, P_miss_spoof there."""
    s = np.asarray(asv_scores, dtype=np.float64).reshape(-1)
    lab = np.asarray(asv_labels).reshape(-1).astype(str)
    if s.size != lab.size:
        raise ValueError(f"asv_scores and asv_labels differ in length: {s.size} vs {lab.size}")
    odd = sorted(set(lab.tolist()) - set(ASV_LABELS))
    if odd:
        raise ValueError(f"asv_labels must be one of {ASV_LABELS}, found {odd[:5]}")
    spoof = s[lab == "spoof"]
    if spoof.size == 0:
        raise ValueError("asv_labels hold no 'spoof' trials: t-DCF needs the ASV's spoof false-alarm rate")
    keep = lab != "spoof"
    if not np.isfinite(spoof).all():
        raise ValueError("asv_scores contain NaN/inf values")
    tv, ty = _binary_inputs(s[keep], lab[keep] == "target", what="asv_scores")
    t = eer_asvspoof(tv, ty).threshold
    return ASVRates(
        threshold=t,
        p_miss=float(np.mean(tv[ty] < t)),
        p_fa=float(np.mean(tv[~ty] >= t)),
        p_miss_spoof=float(np.mean(spoof < t)),
    )


@dataclass(frozen=True)
class TDCFResult:
    """min_tdcf = min over CM thresholds of the normalized t-DCF; curve[k] is its value when the
    CM accepts `cm_score >= thresholds[k]`. c0 is 0 for the 2019 legacy form."""

    min_tdcf: float
    threshold: float
    curve: np.ndarray
    thresholds: np.ndarray
    c0: float
    c1: float
    c2: float
    asv: ASVRates


def _cm_rates(cm_scores: Any, cm_labels: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    far, frr, thr = det_curve(cm_scores, cm_labels)  # bona fide = target
    return frr, far, thr  # P_miss_cm (bona fide rejected), P_fa_cm (spoof accepted)


def tdcf_2019(
    cm_scores: Any,
    cm_labels: Any,
    asv_scores: Any,
    asv_labels: Sequence[str],
    p_spoof: float = 0.05,
    c_miss_asv: float = 1.0,
    c_fa_asv: float = 10.0,
    c_miss_cm: float = 1.0,
    c_fa_cm: float = 10.0,
) -> TDCFResult:
    """Legacy ASVspoof 2019 t-DCF (the one every 2019 LA paper reports, e.g. AASIST 0.0275).

    Priors P_tar = 0.99 (1 - P_spoof), P_non = 0.01 (1 - P_spoof): 0.9405 and 0.0095 by default.
      C1 = P_tar (C_miss_cm - C_miss_asv P_miss_asv) - P_non C_fa_asv P_fa_asv
      C2 = C_fa_cm P_spoof (1 - P_miss_spoof_asv)
      tDCF(s) = (C1 P_miss_cm(s) + C2 P_fa_cm(s)) / min(C1, C2)
    so a CM that accepts everything scores C2 / min(C1, C2), one that rejects everything
    C1 / min(C1, C2), and the minimum is at most 1. cm_labels: 1 bona fide, 0 spoof;
    asv_labels: "target", "nontarget", "spoof".
    """
    asv = asv_error_rates(asv_scores, asv_labels)
    p_tar, p_non = (1 - p_spoof) * 0.99, (1 - p_spoof) * 0.01
    c1 = p_tar * (c_miss_cm - c_miss_asv * asv.p_miss) - p_non * c_fa_asv * asv.p_fa
    c2 = c_fa_cm * p_spoof * (1 - asv.p_miss_spoof)
    if c1 < 0 or c2 < 0:
        raise ValueError(f"t-DCF weights are negative (C1={c1:.4g}, C2={c2:.4g}): check the ASV scores and labels")
    if min(c1, c2) == 0:
        raise ValueError(
            f"t-DCF normalization min(C1, C2) is 0 (C1={c1:.4g}, C2={c2:.4g}): the ASV alone already rejects every "
            "spoof or has no cost to save, so the normalized t-DCF is undefined"
        )
    miss_cm, fa_cm, thr = _cm_rates(cm_scores, cm_labels)
    curve = (c1 * miss_cm + c2 * fa_cm) / min(c1, c2)
    k = int(np.argmin(curve))
    return TDCFResult(float(curve[k]), float(thr[k]), curve, thr, 0.0, float(c1), float(c2), asv)


def tdcf_2021(
    cm_scores: Any,
    cm_labels: Any,
    asv_scores: Any,
    asv_labels: Sequence[str],
    p_spoof: float = 0.05,
    c_miss: float = 1.0,
    c_fa: float = 10.0,
    c_fa_spoof: float = 10.0,
) -> TDCFResult:
    """Revised t-DCF of the ASVspoof 2021 evaluation package (Kinnunen et al. 2020):

      C0 = P_tar C_miss P_miss_asv + P_non C_fa P_fa_asv
      C1 = P_tar C_miss - C0
      C2 = P_spoof C_fa_spoof P_fa_spoof_asv          (P_fa_spoof_asv = 1 - P_miss_spoof_asv)
      tDCF(s) = (C0 + C1 P_miss_cm(s) + C2 P_fa_cm(s)) / (C0 + min(C1, C2))
    with P_tar = 0.99 (1 - P_spoof), P_non = 0.01 (1 - P_spoof). A perfect CM scores
    C0 / (C0 + min(C1, C2)), not 0: the ASV's own errors remain.
    """
    asv = asv_error_rates(asv_scores, asv_labels)
    p_tar, p_non = (1 - p_spoof) * 0.99, (1 - p_spoof) * 0.01
    c0 = p_tar * c_miss * asv.p_miss + p_non * c_fa * asv.p_fa
    c1 = p_tar * c_miss - c0
    c2 = p_spoof * c_fa_spoof * (1 - asv.p_miss_spoof)
    if c0 < 0 or c1 < 0 or c2 < 0:
        raise ValueError(f"t-DCF weights are negative (C0={c0:.4g}, C1={c1:.4g}, C2={c2:.4g}): check the ASV scores")
    if c0 + min(c1, c2) == 0:
        raise ValueError("t-DCF normalization C0 + min(C1, C2) is 0: the normalized t-DCF is undefined")
    miss_cm, fa_cm, thr = _cm_rates(cm_scores, cm_labels)
    curve = (c0 + c1 * miss_cm + c2 * fa_cm) / (c0 + min(c1, c2))
    k = int(np.argmin(curve))
    return TDCFResult(float(curve[k]), float(thr[k]), curve, thr, float(c0), float(c1), float(c2), asv)


# ----------------------------------------------------------------------------- classification


def confusion_matrix(y_true: Any, y_pred: Any, num_classes: int | None = None) -> np.ndarray:
    """int64 [C, C]: row = true class, column = predicted class (scikit-learn's orientation)."""
    from sklearn.metrics import confusion_matrix as sk_confusion_matrix

    t, p, c = _class_inputs(y_true, y_pred, num_classes)
    with warnings.catch_warnings():
        # scikit-learn warns on any 1 x 1 result, even one asked for through `labels` (C = 1).
        warnings.filterwarnings("ignore", "A single label was found", UserWarning)
        return sk_confusion_matrix(t, p, labels=np.arange(c))


def per_class_recall(y_true: Any, y_pred: Any, num_classes: int | None = None) -> np.ndarray:
    """float64 [C]: correct / support per true class; NaN for classes absent from y_true."""
    from sklearn.metrics import recall_score

    t, p, c = _class_inputs(y_true, y_pred, num_classes)
    # NaN, not 0, for a class without support: it has no recall, and UA must leave it out.
    return recall_score(t, p, labels=np.arange(c), average=None, zero_division=np.nan)


def accuracy(y_true: Any, y_pred: Any) -> float:
    """Weighted accuracy (WA): the fraction of correct predictions."""
    from sklearn.metrics import accuracy_score

    t, p, _ = _class_inputs(y_true, y_pred)
    return float(accuracy_score(t, p))


def unweighted_accuracy(y_true: Any, y_pred: Any, num_classes: int | None = None) -> float:
    """Unweighted accuracy (UA): mean recall over the classes present in y_true
    (= scikit-learn's balanced_accuracy_score), so a majority class cannot carry it."""
    # nanmean over all C classes, not balanced_accuracy_score or recall_score(average="macro"): those
    # sum only the present classes, in another order, and with 8 or more classes and one absent land
    # 1 ulp away; this order is the one every reported UA was computed in.
    return float(np.nanmean(per_class_recall(y_true, y_pred, num_classes)))


def f1_macro(y_true: Any, y_pred: Any) -> float:
    """Unweighted mean of per-class F1 over classes in y_true or y_pred (sklearn average='macro')."""
    from sklearn.metrics import f1_score

    t, p, _ = _class_inputs(y_true, y_pred)
    return float(f1_score(t, p, average="macro"))


def f1_weighted(y_true: Any, y_pred: Any) -> float:
    """Per-class F1 averaged with weights = true support (sklearn average='weighted'; MELD's metric)."""
    from sklearn.metrics import f1_score

    t, p, _ = _class_inputs(y_true, y_pred)
    return float(f1_score(t, p, average="weighted"))


def ccc(x: Any, y: Any) -> float:
    """Lin's concordance correlation coefficient with population moments:
    2 cov(x, y) / (var x + var y + (mean x - mean y)^2). 1 = identical, 0 = no agreement."""
    a = np.asarray(x, dtype=np.float64).reshape(-1)
    b = np.asarray(y, dtype=np.float64).reshape(-1)
    if a.size == 0:
        raise ValueError("ccc: inputs are empty")
    if a.size != b.size:
        raise ValueError(f"ccc: inputs differ in length: {a.size} vs {b.size}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("ccc: inputs contain NaN/inf values")
    ma, mb = a.mean(), b.mean()
    cov = np.mean((a - ma) * (b - mb))
    den = a.var() + b.var() + (ma - mb) ** 2
    if den == 0:
        raise ValueError("ccc: undefined for two identical constant sequences")
    return float(2 * cov / den)


def classification_report(y_true: Any, y_pred: Any, class_names: Sequence[str]) -> dict[str, Any]:
    """WA, UA, macro and weighted F1, per-class recall and support (keyed by name; recall None for
    classes absent from y_true) and the confusion matrix (rows true, columns predicted): JSON-ready."""
    num_classes = len(class_names)
    cm = confusion_matrix(y_true, y_pred, num_classes)
    recall = per_class_recall(y_true, y_pred, num_classes)
    return {
        "accuracy": accuracy(y_true, y_pred),
        "unweighted_accuracy": unweighted_accuracy(y_true, y_pred, num_classes),
        "f1_macro": f1_macro(y_true, y_pred),
        "f1_weighted": f1_weighted(y_true, y_pred),
        "recall": {n: (None if np.isnan(r) else float(r)) for n, r in zip(class_names, recall)},
        "support": {n: int(s) for n, s in zip(class_names, cm.sum(axis=1))},
        "confusion_matrix": cm.tolist(),
        "num_samples": int(cm.sum()),
    }


# ----------------------------------------------------------------------------- comparing two systems
# Written out: scipy.stats.bootstrap resamples single samples, not whole speakers (clusters).


@dataclass(frozen=True)
class BootstrapResult:
    difference: float  # the statistic on the whole test set
    standard_error: float  # standard deviation of the statistic over the resamples
    low: float  # 2.5th and 97.5th percentiles over the resamples
    high: float
    resamples: int  # resamples the statistic was defined on
    clusters: int


def paired_bootstrap(statistic: Callable[[np.ndarray], float], clusters: Any, resamples: int = 1000,
                     seed: int = 0) -> BootstrapResult:
    """Paired cluster bootstrap of a comparison of two systems scored on the same test samples.

    `statistic(idx)` computes the comparison (e.g. EER of system Q minus EER of system P) on the
    samples `idx` (indices into the test set, with repeats); `clusters[i]` names the group sample i
    belongs to (its speaker). Each resample draws whole clusters with replacement, as many as there
    are, and keeps every sample of a drawn cluster, so correlated samples (one speaker's clips) count
    as the one unit of evidence they are, and both systems are always scored on the same samples,
    so what they have in common (hard clips, easy speakers) cancels in the difference (Bisani & Ney,
    ICASSP 2004, with clusters for Koehn-style paired resampling). Resamples where the statistic is
    undefined (ValueError: e.g. one class missing) are skipped; fewer than half defined raises."""
    groups = np.asarray(clusters).reshape(-1)
    if groups.size == 0:
        raise ValueError("paired_bootstrap: no samples")
    if resamples < 2:
        raise ValueError(f"paired_bootstrap: resamples must be >= 2, got {resamples}")
    names, inverse = np.unique(groups, return_inverse=True)
    members = [np.flatnonzero(inverse == k) for k in range(names.size)]
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(resamples):
        drawn = rng.integers(0, names.size, names.size)
        try:
            values.append(float(statistic(np.concatenate([members[k] for k in drawn]))))
        except ValueError:
            continue
    if len(values) < resamples / 2:
        raise ValueError(f"paired_bootstrap: the statistic is undefined on {resamples - len(values)} of {resamples} resamples "
                         f"({names.size} clusters): too few clusters or a class missing from most of them")
    v = np.asarray(values)
    low, high = np.percentile(v, [2.5, 97.5])
    return BootstrapResult(float(statistic(np.arange(groups.size))), float(v.std(ddof=1)), float(low), float(high),
                           v.size, int(names.size))
