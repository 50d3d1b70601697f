"""Evaluation metrics: hand-computed cases, and agreement with scikit-learn on random data."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn import metrics as skm

from avssl.finetune import metrics as M

# Four targets, four non-targets. Operating points (accept score >= t), FRR = targets below t,
# FAR = non-targets at or above t:
#   t    0.1  0.2  0.3  0.4  0.6  0.7  0.8  0.9  inf
#   FRR  0    0    0    1/4  1/4  1/4  1/2  3/4  1
#   FAR  1    3/4  1/2  1/2  1/4  0    0    0    0
TAR = [0.9, 0.8, 0.7, 0.3]
NON = [0.6, 0.4, 0.2, 0.1]
SCORES = TAR + NON
LABELS = [1, 1, 1, 1, 0, 0, 0, 0]


def test_eer_exact_crossing():
    """At t = 0.6 FRR = FAR = 1/4 exactly, so both EER variants give 0.25 there."""
    e = M.eer(SCORES, LABELS)
    assert e.eer == pytest.approx(0.25) and e.threshold == pytest.approx(0.6)
    a = M.eer_asvspoof(SCORES, LABELS)
    assert a.eer == pytest.approx(0.25) and a.threshold == pytest.approx(0.6)


def test_eer_interpolates_where_asvspoof_takes_the_nearest_point():
    """A vertical DET step: WeSpeaker's crossing (0.25) vs ASVspoof's min-|FRR-FAR| mean (0.125)."""
    # targets 0.9, 0.5; non-targets 0.6, 0.3, 0.2, 0.1.
    #   t = 0.5: FRR 0,   FAR 1/4  (d = FRR - FAR = -1/4)
    #   t = 0.6: FRR 1/2, FAR 1/4  (d = +1/4)
    # Crossing: alpha = 1/4 / (1/2) = 1/2 -> EER = 0 + 1/2 * 1/2 = 1/4, threshold 0.5 + 1/2 * 0.1 = 0.55.
    # ASVspoof: |d| ties at 1/4, the first (t = 0.5) wins -> (0 + 1/4) / 2 = 1/8.
    scores, labels = [0.9, 0.5, 0.6, 0.3, 0.2, 0.1], [1, 1, 0, 0, 0, 0]
    e = M.eer(scores, labels)
    assert e.eer == pytest.approx(0.25) and e.threshold == pytest.approx(0.55)
    assert M.eer_asvspoof(scores, labels).eer == pytest.approx(0.125)


def test_per_attack_eer_scores_each_attack_against_all_bona_fide():
    """Bona fide 0.9, 0.8, 0.7, 0.2; attack X's spoofs 0.1, 0.05 lie below every bona fide clip (EER 0),
    attack Y's 0.85, 0.75 interleave with them; one-class input gives no breakdown."""
    scores = [0.9, 0.8, 0.7, 0.2, 0.1, 0.05, 0.85, 0.75]
    labels = [1, 1, 1, 1, 0, 0, 0, 0]
    attacks = ["-", "-", "-", "-", "X", "X", "Y", "Y"]
    got = M.per_attack_eer(scores, labels, attacks)
    assert set(got) == {"X", "Y"} and got["X"] == 0.0
    assert got["Y"] == pytest.approx(M.eer([0.9, 0.8, 0.7, 0.2, 0.85, 0.75], [1, 1, 1, 1, 0, 0]).eer)
    assert got["Y"] == pytest.approx(0.5)  # FRR = FAR = 1/2 at t = 0.8: 0.9 and 0.8 accepted, 0.85 accepted
    assert M.per_attack_eer([0.1, 0.2], [1, 1], ["-", "-"]) == {}
    with pytest.raises(ValueError, match="attacks has 1 entries for 8 scores"):
        M.per_attack_eer(scores, labels, ["X"])


def test_eer_tied_scores_move_together():
    """A target and a non-target tied at 0.5 form one operating point; the crossing lies between points."""
    # targets 0.9, 0.5; non-targets 0.5, 0.1:
    #   t = 0.5: FRR 0, FAR 1/2 (d = -1/2);  t = 0.9: FRR 1/2, FAR 0 (d = +1/2)
    # alpha = 1/2 -> EER = 0 + 1/2 * 1/2 = 1/4 at threshold 0.5 + 1/2 * 0.4 = 0.7.
    e = M.eer([0.9, 0.5, 0.5, 0.1], [1, 1, 0, 0])
    assert e.eer == pytest.approx(0.25) and e.threshold == pytest.approx(0.7)


def test_min_dcf_by_hand():
    """minDCF from the table above, normalized by min(P_tar, 1 - P_tar), at both a low and a high prior."""
    # P_tar 0.1: cost = 0.1 FRR + 0.9 FAR; best at t = 0.7: 0.1 * 1/4 = 0.025; / min(0.1, 0.9) = 0.25.
    value, thr = M.min_dcf(SCORES, LABELS, 0.1)
    assert value == pytest.approx(0.25) and thr == pytest.approx(0.7)
    # P_tar 0.9: cost = 0.9 FRR + 0.1 FAR; best at t = 0.3: 0.1 * 1/2 = 0.05; / 0.1 = 0.5.
    value, thr = M.min_dcf(SCORES, LABELS, 0.9)
    assert value == pytest.approx(0.5) and thr == pytest.approx(0.3)
    # C_fa = 10 at P_tar 0.5: cost = 0.5 FRR + 5 FAR; t = 0.7 gives 0.125, the normalizer min(0.5, 5) = 0.5 -> 0.25.
    assert M.min_dcf(SCORES, LABELS, 0.5, c_fa=10)[0] == pytest.approx(0.25)


def test_min_dcf_of_a_useless_detector_is_one():
    """A detector whose scores carry no information cannot beat the trivial system: minDCF = 1."""
    # All scores equal: the only operating points are accept-all (FAR 1) and reject-all (FRR 1).
    assert M.min_dcf([0.0] * 6, [1, 0, 1, 0, 1, 0], 0.01)[0] == pytest.approx(1.0)


def test_det_curve_endpoints_and_monotone():
    """The DET curve runs from accept-all (FAR 1, FRR 0) to reject-all (FAR 0, FRR 1), monotonically."""
    far, frr, thr = M.det_curve(SCORES, LABELS)
    assert (far[0], frr[0], far[-1], frr[-1]) == (1.0, 0.0, 0.0, 1.0)
    assert np.all(np.diff(far) <= 0) and np.all(np.diff(frr) >= 0) and np.all(np.diff(thr) > 0)
    assert np.isinf(thr[-1]) and len(thr) == 9


def _sklearn_eer(scores: np.ndarray, labels: np.ndarray) -> float:
    """EER from scikit-learn's ROC: linear crossing of fnr = 1 - tpr and fpr between adjacent points."""
    fpr, tpr, _ = skm.roc_curve(labels, scores, drop_intermediate=False)
    fnr = 1 - tpr
    d = fnr - fpr  # decreasing along sklearn's order (thresholds descending)
    j = int(np.flatnonzero(d <= 0)[0])
    if d[j] == 0:
        return float(fnr[j])
    i = j - 1
    alpha = d[i] / (d[i] - d[j])
    return float(fnr[i] + alpha * (fnr[j] - fnr[i]))


def test_eer_and_min_dcf_match_sklearn_roc_on_random_trials():
    """2000 Gaussian trials: EER equals the crossing of sklearn's fpr/fnr; minDCF equals its brute force."""
    rng = np.random.default_rng(0)
    labels = (rng.random(2000) < 0.3).astype(int)
    scores = rng.normal(size=2000) + 1.5 * labels
    ours = M.eer(scores, labels).eer
    assert ours == pytest.approx(_sklearn_eer(scores, labels), abs=1e-9)
    assert 0.15 < ours < 0.30  # d' = 1.5 -> EER about Phi(-0.75) = 0.23
    # ASVspoof's variant differs from the interpolated one by less than one trial's step.
    assert abs(M.eer_asvspoof(scores, labels).eer - ours) < 1 / min(labels.sum(), (1 - labels).sum())
    fpr, tpr, _ = skm.roc_curve(labels, scores, drop_intermediate=False)
    for p in (0.01, 0.05):
        brute = np.min(p * (1 - tpr) + (1 - p) * fpr) / min(p, 1 - p)
        assert M.min_dcf(scores, labels, p)[0] == pytest.approx(brute, abs=1e-12)


def test_binary_report_is_json_ready():
    """binary_report returns plain numbers that json.dumps accepts, with the hand-computed EER."""
    report = M.binary_report(SCORES, LABELS)
    assert json.loads(json.dumps(report))["eer"] == pytest.approx(0.25)
    assert set(report) >= {"eer", "eer_asvspoof", "min_dcf_0.01", "min_dcf_0.05"}
    assert all(isinstance(v, (int, float)) for v in report.values())


@pytest.mark.parametrize(
    "scores, labels, match",
    [
        ([], [], "empty"),
        ([0.1, 0.2], [1, 0, 1], "differ in length"),
        ([0.1, float("nan")], [1, 0], "NaN"),
        ([0.1, 0.2], [1, 1], "only target"),
        ([0.1, 0.2], [0, 0], "only non-target"),
        ([0.1, 0.2], [1, 2], "0/1"),
    ],
)
def test_binary_metrics_reject_bad_input(scores, labels, match):
    """Empty input, length mismatch, NaN scores, one class only and non-0/1 labels raise a clear ValueError."""
    with pytest.raises(ValueError, match=match):
        M.eer(scores, labels)
    with pytest.raises(ValueError, match=match):
        M.min_dcf(scores, labels, 0.01)


# ----------------------------------------------------------------------------- t-DCF

# ASV: targets 1, 3, 4, 5; non-targets 0, 2, -1, -2; spoofs 1.5, 2.5, 3.5, 0.5.
# ASV EER point (min |FRR - FAR|): t = 2 -> FRR = 1/4 (target 1), FAR = 1/4 (non-target 2).
# Spoofs below 2: 1.5, 0.5 -> P_miss_spoof_asv = 1/2.
ASV_SCORES = [1, 3, 4, 5, 0, 2, -1, -2, 1.5, 2.5, 3.5, 0.5]
ASV_LABELS = ["target"] * 4 + ["nontarget"] * 4 + ["spoof"] * 4
# CM: bona fide 0.8, 0.6; spoof 0.7, 0.1. (P_miss_cm, P_fa_cm) at t = 0.1, 0.6, 0.7, 0.8, inf:
#   (0, 1), (0, 1/2), (1/2, 1/2), (1/2, 0), (1, 0)
CM_SCORES = [0.8, 0.6, 0.7, 0.1]
CM_LABELS = [1, 1, 0, 0]
P_TAR, P_NON, P_SPOOF = 0.9405, 0.0095, 0.05


def test_asv_error_rates_by_hand():
    """The ASV threshold is its EER point, and the miss / false-alarm / spoof-miss rates there are as computed."""
    r = M.asv_error_rates(ASV_SCORES, ASV_LABELS)
    assert (r.threshold, r.p_miss, r.p_fa, r.p_miss_spoof) == (2.0, 0.25, 0.25, 0.5)


def test_tdcf_2019_by_hand():
    """Legacy t-DCF: C1, C2 and the minimum over CM thresholds match the arithmetic below."""
    # C1 = P_tar (C_miss_cm - C_miss_asv P_miss_asv) - P_non C_fa_asv P_fa_asv
    #    = 0.9405 * (1 - 0.25) - 0.0095 * 10 * 0.25 = 0.705375 - 0.02375 = 0.681625
    # C2 = C_fa_cm P_spoof (1 - P_miss_spoof_asv) = 10 * 0.05 * 0.5 = 0.25
    # tDCF = (C1 P_miss_cm + C2 P_fa_cm) / 0.25 at the five CM points:
    #   1.0, 0.5, (0.3408125 + 0.125) / 0.25 = 1.86325, 1.36325, 2.7265  -> min 0.5 at t = 0.6
    r = M.tdcf_2019(CM_SCORES, CM_LABELS, ASV_SCORES, ASV_LABELS)
    assert r.c1 == pytest.approx(0.681625) and r.c2 == pytest.approx(0.25) and r.c0 == 0.0
    np.testing.assert_allclose(r.curve, [1.0, 0.5, 1.86325, 1.36325, 2.7265])
    assert r.min_tdcf == pytest.approx(0.5) and r.threshold == pytest.approx(0.6)


def test_tdcf_2021_by_hand():
    """Revised t-DCF: C0, C1, C2 and the minimum match the arithmetic below, and differ from the legacy value."""
    # C0 = P_tar C_miss P_miss_asv + P_non C_fa P_fa_asv = 0.9405 * 0.25 + 0.0095 * 10 * 0.25 = 0.258875
    # C1 = P_tar C_miss - C0 = 0.9405 - 0.258875 = 0.681625
    # C2 = P_spoof C_fa_spoof (1 - P_miss_spoof_asv) = 0.05 * 10 * 0.5 = 0.25
    # tDCF(t = 0.6) = (C0 + C1 * 0 + C2 * 1/2) / (C0 + min(C1, C2)) = 0.383875 / 0.508875 = 0.754360...
    r = M.tdcf_2021(CM_SCORES, CM_LABELS, ASV_SCORES, ASV_LABELS)
    assert (r.c0, r.c1, r.c2) == pytest.approx((0.258875, 0.681625, 0.25))
    assert r.min_tdcf == pytest.approx(0.383875 / 0.508875) and r.threshold == pytest.approx(0.6)


def test_tdcf_perfect_cm_and_trivial_cms():
    """Perfect CM: legacy t-DCF 0, revised C0/(C0+min(C1,C2)); accept-all / reject-all CMs cost C2 and C1 (normalized)."""
    perfect = ([1.0, 2.0, -1.0, 0.0], [1, 1, 0, 0])  # a threshold in (0, 1] separates bona fide from spoof
    r19 = M.tdcf_2019(*perfect, ASV_SCORES, ASV_LABELS)
    assert r19.min_tdcf == 0.0
    r21 = M.tdcf_2021(*perfect, ASV_SCORES, ASV_LABELS)
    assert r21.min_tdcf == pytest.approx(r21.c0 / (r21.c0 + min(r21.c1, r21.c2))) and r21.min_tdcf > 0
    for r in (r19, r21):
        norm = r.c0 + min(r.c1, r.c2)
        # curve[0]: CM accepts everything (P_miss_cm 0, P_fa_cm 1); curve[-1]: rejects everything.
        assert r.curve[0] == pytest.approx((r.c0 + r.c2) / norm)
        assert r.curve[-1] == pytest.approx((r.c0 + r.c1) / norm)
        assert r.min_tdcf <= 1.0 + 1e-12


def test_tdcf_rejects_bad_asv_input():
    """ASV labels outside target/nontarget/spoof, or no spoof trials, raise ValueError."""
    with pytest.raises(ValueError, match="asv_labels must be one of"):
        M.tdcf_2019(CM_SCORES, CM_LABELS, [1.0, 0.0], ["target", "impostor"])
    with pytest.raises(ValueError, match="no 'spoof'"):
        M.tdcf_2021(CM_SCORES, CM_LABELS, [1.0, 0.0], ["target", "nontarget"])


# ----------------------------------------------------------------------------- classification


def test_confusion_matrix_by_hand():
    """Rows are true classes, columns predictions, counted by hand."""
    y_true = [0, 0, 1, 1, 2, 2, 2]
    y_pred = [0, 1, 1, 1, 2, 0, 2]
    # true 0 -> predicted 0 once, 1 once; true 1 -> 1 twice; true 2 -> 0 once, 2 twice; class 3 unused.
    expected = [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 2, 0], [0, 0, 0, 0]]
    np.testing.assert_array_equal(M.confusion_matrix(y_true, y_pred, 4), expected)
    np.testing.assert_allclose(M.per_class_recall(y_true, y_pred, 4), [0.5, 1.0, 2 / 3, np.nan])


def test_ua_differs_from_wa_on_imbalanced_classes():
    """Predicting the majority class: WA = 8/10 but UA = (1 + 0)/2 = 0.5."""
    y_true = [0] * 8 + [1] * 2
    y_pred = [0] * 10
    assert M.accuracy(y_true, y_pred) == pytest.approx(0.8)
    assert M.unweighted_accuracy(y_true, y_pred) == pytest.approx(0.5)


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_classification_metrics_match_sklearn():
    """Random 6-class predictions (one class never predicted, one never true): F1, UA, confusion match sklearn."""
    rng = np.random.default_rng(1)
    y_true = rng.integers(0, 5, size=500)  # class 5 never true
    y_pred = np.where(rng.random(500) < 0.6, y_true, rng.integers(0, 6, size=500))
    y_pred[y_pred == 2] = 3  # class 2 never predicted
    assert M.f1_macro(y_true, y_pred) == pytest.approx(skm.f1_score(y_true, y_pred, average="macro", zero_division=0))
    assert M.f1_weighted(y_true, y_pred) == pytest.approx(skm.f1_score(y_true, y_pred, average="weighted", zero_division=0))
    assert M.unweighted_accuracy(y_true, y_pred) == pytest.approx(skm.balanced_accuracy_score(y_true, y_pred))
    assert M.accuracy(y_true, y_pred) == pytest.approx(skm.accuracy_score(y_true, y_pred))
    np.testing.assert_array_equal(M.confusion_matrix(y_true, y_pred, 6), skm.confusion_matrix(y_true, y_pred, labels=range(6)))


def _reference_classification(y_true, y_pred, num_classes=None) -> dict:
    """The classification metrics written out in numpy (bincount confusion matrix, nanmean UA,
    F1 = 2TP / (2TP + FP + FN) over the classes in y_true or y_pred): what the library calls must equal."""
    t, p = np.asarray(y_true).astype(np.int64), np.asarray(y_pred).astype(np.int64)
    c = num_classes or int(max(t.max(), p.max())) + 1
    cm = np.bincount(t * c + p, minlength=c * c).reshape(c, c)
    support, predicted, tp = cm.sum(axis=1), cm.sum(axis=0), np.diag(cm).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(support > 0, np.diag(cm) / support, np.nan)
    present = (support + predicted) > 0
    f1 = (2 * tp / (support + predicted).clip(min=1))[present]
    weights = support[present]
    return {"cm": cm, "recall": recall, "wa": float(np.mean(t == p)), "ua": float(np.nanmean(recall)),
            "f1_macro": float(f1.mean()), "f1_weighted": float((f1 * weights).sum() / weights.sum())}


def _classification_cases():
    rng = np.random.default_rng(7)
    cases = [([0], [0], 1), ([0, 0], [1, 1], 3), ([2, 2, 2], [2, 0, 2], 4), ([1, 1], [1, 1], 2),
             ([True, False, True], [True, True, False], 2), ([0] * 8 + [1] * 2, [0] * 10, 2),
             ([0, 0, 1, 1, 2, 2, 2], [0, 1, 1, 1, 2, 0, 2], 4)]
    for k in range(150):
        c = int(rng.integers(1, 12))
        t = rng.integers(0, c, int(rng.integers(1, 80)))
        p = np.where(rng.random(t.size) < rng.random(), t, rng.integers(0, c, t.size))
        if k % 3 == 0:
            t[t == t[-1]] = t[0]  # a class missing from y_true (but maybe predicted)
        cases.append((t, p, c + int(rng.integers(0, 3))))  # sometimes classes nobody uses
    return cases


def test_library_classification_metrics_equal_the_reference_bit_for_bit():
    """157 cases (one class, bool labels, classes absent from y_true, up to 13 classes): confusion
    matrix, per-class recall (NaN where no support), WA, UA and both F1s are exactly the reference's."""
    for t, p, c in _classification_cases():
        ref = _reference_classification(t, p, c)
        cm = M.confusion_matrix(t, p, c)
        assert cm.dtype == np.int64 and np.array_equal(cm, ref["cm"])
        assert np.array_equal(M.per_class_recall(t, p, c), ref["recall"], equal_nan=True)
        assert M.accuracy(t, p) == ref["wa"]
        assert M.unweighted_accuracy(t, p, c) == ref["ua"]
        free = _reference_classification(t, p)  # num_classes from the labels, as the F1s always do
        assert M.unweighted_accuracy(t, p) == free["ua"]
        assert M.f1_macro(t, p) == free["f1_macro"] and M.f1_weighted(t, p) == free["f1_weighted"]


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_ua_keeps_its_summation_order_where_balanced_accuracy_moves_the_last_bit():
    """Ten classes, 0 and 3 absent from y_true: UA keeps its exact value (balanced_accuracy_score and
    recall_score's macro average sum only the present classes and land 1 ulp away)."""
    y_true = [2, 1, 4, 7, 9, 9, 5, 2, 8, 1, 2, 6, 9, 1]
    y_pred = [8, 7, 1, 1, 2, 5, 8, 0, 8, 1, 7, 6, 0, 6]
    assert M.unweighted_accuracy(y_true, y_pred) == 0.29166666666666663
    assert skm.balanced_accuracy_score(y_true, y_pred) == pytest.approx(0.29166666666666663, abs=1e-15)
    assert M.f1_macro(y_true, y_pred) == 0.16666666666666663
    assert M.f1_weighted(y_true, y_pred) == 0.15476190476190474
    assert M.accuracy(y_true, y_pred) == 0.21428571428571427


def test_one_class_confusion_matrix_is_silent():
    """A 1 x 1 matrix asked for (one class) comes back without scikit-learn's shape warning."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(M.confusion_matrix([0, 0], [0, 0]), [[2]])
        assert M.classification_report([0, 0], [0, 0], ["only"])["unweighted_accuracy"] == 1.0


def test_classification_report_names_and_json():
    """classification_report keys recall and support by class name, None for absent classes, and is JSON-ready."""
    names = ["ANG", "DIS", "FEA"]
    report = M.classification_report([0, 0, 1], [0, 1, 1], names)
    back = json.loads(json.dumps(report))
    assert back["recall"] == {"ANG": 0.5, "DIS": 1.0, "FEA": None}
    assert back["support"] == {"ANG": 2, "DIS": 1, "FEA": 0}
    assert back["accuracy"] == pytest.approx(2 / 3) and back["unweighted_accuracy"] == pytest.approx(0.75)
    assert back["confusion_matrix"] == [[1, 1, 0], [0, 1, 0], [0, 0, 0]]


def test_classification_rejects_bad_input():
    """Empty input, length mismatch, float labels and out-of-range classes raise ValueError."""
    with pytest.raises(ValueError, match="empty"):
        M.accuracy([], [])
    with pytest.raises(ValueError, match="differ in length"):
        M.f1_macro([0, 1], [0])
    with pytest.raises(ValueError, match="integer"):
        M.confusion_matrix([0.5, 1.0], [0, 1])
    with pytest.raises(ValueError, match="out of range"):
        M.confusion_matrix([0, 3], [0, 1], num_classes=3)


def test_ccc_by_hand():
    """CCC: identical = 1; shifted by 2 = 0.5; doubled = 8/19 (population moments)."""
    x = np.array([1.0, 2.0, 3.0, 4.0, 5.0])  # mean 3, var 2
    assert M.ccc(x, x) == pytest.approx(1.0)
    # y = x + 2: cov 2, var 2 + 2, (3 - 5)^2 = 4 -> 2 * 2 / (2 + 2 + 4) = 0.5
    assert M.ccc(x, x + 2) == pytest.approx(0.5)
    # y = 2x: cov 4, var y 8, (3 - 6)^2 = 9 -> 8 / (2 + 8 + 9) = 8/19
    assert M.ccc(x, 2 * x) == pytest.approx(8 / 19)
    assert M.ccc(x, -x) == pytest.approx(-2 * 2 / (2 + 2 + 36))  # cov -2; (3 + 3)^2 = 36
    with pytest.raises(ValueError, match="differ in length"):
        M.ccc(x, x[:3])


# ----------------------------------------------------------------------------- paired bootstrap


def _mean_difference(p: np.ndarray, q: np.ndarray):
    return lambda idx: float(p[idx].mean() - q[idx].mean())


def test_paired_bootstrap_of_identical_systems_has_no_spread():
    x = np.random.default_rng(0).normal(size=50)
    r = M.paired_bootstrap(_mean_difference(x, x), np.arange(50), resamples=200)
    assert r.difference == 0.0 and r.standard_error == 0.0 and r.low == r.high == 0.0


def test_paired_bootstrap_of_a_mean_matches_the_textbook_standard_error():
    """One sample per cluster: the bootstrap SE of a mean difference is sd(d) sqrt((n-1)/n) / sqrt(n)."""
    rng = np.random.default_rng(1)
    p, q = rng.normal(1.0, 1.0, 400), rng.normal(0.0, 1.0, 400)
    r = M.paired_bootstrap(_mean_difference(p, q), np.arange(400), resamples=2000, seed=3)
    d = p - q
    assert r.difference == pytest.approx(d.mean())
    assert r.standard_error == pytest.approx(d.std() / np.sqrt(d.size), rel=0.08)
    assert r.low < d.mean() < r.high and r.clusters == 400 and r.resamples == 2000


def test_paired_bootstrap_pairs_the_systems():
    """Two systems sharing a large per-sample effect (hard and easy clips): the pairing cancels it,
    so the SE is that of the small per-sample differences, not of either system."""
    rng = np.random.default_rng(2)
    shared = rng.normal(0.0, 10.0, 300)
    p, q = shared + 0.5 + rng.normal(0, 0.1, 300), shared + rng.normal(0, 0.1, 300)
    r = M.paired_bootstrap(_mean_difference(p, q), np.arange(300), resamples=500)
    assert r.standard_error < 0.02 and r.low > 0.4


def test_paired_bootstrap_counts_a_cluster_once_however_many_samples_it_has():
    """Each sample copied five times inside its own cluster: the same seed draws the same clusters and
    every resampled mean is unchanged, so the SE is exactly that of the uncopied set (a per-sample
    bootstrap would shrink it by sqrt(5))."""
    rng = np.random.default_rng(4)
    p, q = rng.normal(size=40), rng.normal(size=40)
    single = M.paired_bootstrap(_mean_difference(p, q), np.arange(40), resamples=300, seed=7)
    copied = M.paired_bootstrap(_mean_difference(np.repeat(p, 5), np.repeat(q, 5)), np.repeat(np.arange(40), 5),
                                resamples=300, seed=7)
    assert copied.standard_error == pytest.approx(single.standard_error, rel=1e-9)
    assert copied.clusters == 40


def test_paired_bootstrap_skips_undefined_resamples_and_refuses_mostly_undefined():
    # Cluster 0 holds targets only, 1 non-targets only, 2 both: a draw without a target (or without a
    # non-target) source, (1/3)^3 each, leaves the EER undefined and is skipped.
    labels = np.array([1, 1, 0, 0, 1, 0])
    clusters = np.array([0, 0, 1, 1, 2, 2])
    scores = np.array([0.9, 0.8, 0.1, 0.2, 0.7, 0.3])
    eer_gap = lambda idx: M.eer(-scores[idx], labels[idx]).eer - M.eer(scores[idx], labels[idx]).eer  # noqa: E731
    r = M.paired_bootstrap(eer_gap, clusters, resamples=400)
    assert r.difference == 1.0 and 330 < r.resamples < 400
    only_targets = lambda idx: M.eer(scores[idx], np.ones(idx.size)).eer  # noqa: E731
    with pytest.raises(ValueError, match="undefined on 400 of 400"):
        M.paired_bootstrap(only_targets, clusters, resamples=400)
    with pytest.raises(ValueError, match="no samples"):
        M.paired_bootstrap(eer_gap, [], resamples=10)


def test_plots_draw_our_operating_points_and_counts(tmp_path, monkeypatch):
    """plot_binary's DET line is norm.ppf of det_curve's (clipped) rates, plot_confusion writes every
    count in its cell; both save the files evaluate lists."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy.stats import norm

    from avssl.finetune.evaluate import plot_binary, plot_confusion

    scores, labels = np.array(SCORES), np.array(LABELS)
    raw = {"av": {"scores": scores, "labels": labels, "groups": np.where(labels == 1, "target", "nontarget")}}
    drawn = []
    real_savefig = plt.Figure.savefig

    def keep_lines(fig, path, **kw):  # the figure is closed after saving: read its artists first
        drawn.append((path.name, [line.get_xydata() for ax in fig.axes for line in ax.get_lines()],
                      [t.get_text() for ax in fig.axes for t in ax.texts]))
        return real_savefig(fig, path, **kw)

    monkeypatch.setattr(plt.Figure, "savefig", keep_lines)
    paths = plot_binary(raw, tmp_path, "test")
    report = {"a": M.classification_report([0, 0, 1, 2], [0, 1, 1, 1], ["x", "y", "z"])}
    paths += plot_confusion(report, ["x", "y", "z"], tmp_path)
    assert [p.name for p in paths] == ["det_curve.png", "scores_av.png", "confusion_a.png"]
    assert all(p.is_file() and p.stat().st_size > 0 for p in paths)
    far, frr, _ = M.det_curve(scores, labels)
    (name, lines, _), *_ = drawn
    assert name == "det_curve.png" and len(lines) == 1
    np.testing.assert_array_equal(lines[0], np.column_stack([norm.ppf(np.clip(far, 1e-4, 1 - 1e-4)),
                                                             norm.ppf(np.clip(frr, 1e-4, 1 - 1e-4))]))
    assert drawn[-1][0] == "confusion_a.png"
    assert drawn[-1][2] == [str(v) for v in np.ravel(report["a"]["confusion_matrix"])]


def test_summary_table_names_every_headline_metric_under_its_own_header():
    """The printed evaluation table: one row per modality, one header per metric (it had blank
    headers and dropped minDCF 0.05); attacks a mode lacks and t-DCF without ASV scores show '-'."""
    from avssl.finetune.evaluate import summary_table

    spoof = {"task": "spoof", "results": {
        "av": {**M.binary_report(SCORES, LABELS), "per_attack_eer": {"A01": 0.25, "A02": 0.5}, "min_tdcf_2019": 0.31},
        "a": {**M.binary_report(SCORES, LABELS), "per_attack_eer": {"A01": 0.0}},
    }}
    header, rows = summary_table(spoof)
    assert header == ["modality", "EER %", "minDCF 0.01", "minDCF 0.05", "min t-DCF 2019", "EER A01 %", "EER A02 %"]
    assert rows[0] == ["AV", "25.00", f"{M.min_dcf(SCORES, LABELS, 0.01)[0]:.3f}", f"{M.min_dcf(SCORES, LABELS, 0.05)[0]:.3f}",
                       "0.3100", "25.0", "50.0"]
    assert rows[1][0] == "A" and rows[1][4:] == ["-", "0.0", "-"]

    y_true, y_pred = [0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 2, 0]
    emotion = {"task": "emotion", "results": {"v": {**M.classification_report(y_true, y_pred, ["x", "y", "z"]), "n": 6}}}
    header, rows = summary_table(emotion)
    assert header == ["modality", "UA %", "WA %", "macro-F1 %", "weighted-F1 %", "clips"]
    assert rows == [["V", "66.7", "66.7", f"{100 * M.f1_macro(y_true, y_pred):.1f}", f"{100 * M.f1_weighted(y_true, y_pred):.1f}", "6"]]
