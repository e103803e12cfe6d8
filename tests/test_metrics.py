import numpy as np

from dermtrain.metrics import (auc_binary, balanced_accuracy, binary_rates, choose_flag, class_table, confusion,
                               fit_temperature, mel_flag_scores, nll, softmax, summarize, threshold_for_sensitivity)
from engines.bundle import ModelBundle
from engines.labels import CLASS_CODES, MEL_INDEX
from engines.preprocess import PreprocessSpec


def test_table_and_balanced_accuracy_match_hand_computed_confusion():
    # true class 4 (mel): 3 right, 2 called nv (5), 1 called bkl (2); true class 5 (nv): 4 right, 1 called mel.
    y = np.array([4, 4, 4, 4, 4, 4, 5, 5, 5, 5, 5, 0, 0])
    p = np.array([4, 4, 4, 5, 5, 2, 5, 5, 5, 5, 4, 0, 1])
    cm = confusion(y, p)
    assert cm[4, 4] == 3 and cm[4, 5] == 2 and cm[4, 2] == 1 and cm[5, 4] == 1
    # recalls of present classes: akiec 1/2, mel 3/6, nv 4/5 -> mean
    assert abs(balanced_accuracy(cm) - np.mean([1 / 2, 3 / 6, 4 / 5])) < 1e-12
    mel = class_table(cm)[4]
    assert (mel["correct"], mel["total"], mel["confused_with"], mel["confused_count"]) == (3, 6, "nv", 2)
    assert abs(mel["confused_share"] - 2 / 6) < 1e-12


def test_auc_matches_pairwise_count():
    rng = np.random.default_rng(0)
    s = rng.integers(0, 5, 60).astype(float)
    pos = rng.random(60) < 0.3
    pairs = [(a > b) + 0.5 * (a == b) for a in s[pos] for b in s[~pos]]
    assert abs(auc_binary(s, pos) - np.mean(pairs)) < 1e-12


def test_threshold_reaches_target_sensitivity():
    rng = np.random.default_rng(1)
    p = rng.random(500)
    pos = rng.random(500) < 0.2
    t = threshold_for_sensitivity(p, pos, 0.9)
    assert (p[pos] >= t).mean() >= 0.9
    kth = np.sort(p[pos])[::-1][int(np.ceil(0.9 * pos.sum())) - 1]
    assert (p[pos] > kth).mean() < 0.9  # no higher threshold would do
    assert t < kth and not np.any((p >= t) & (p < kth))  # no image sits between t and the k-th positive


def test_temperature_lowers_nll_of_overconfident_logits():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 7, 400)
    logits = rng.normal(size=(400, 7))
    logits[np.arange(400), y] += 1.0
    logits *= 5  # overconfident
    t = fit_temperature(logits, y)
    assert t > 1.5 and nll(logits, y, t) < nll(logits, y, 1.0)
    s = summarize(logits, y, t, 0.3)
    assert set(s["melanoma"]) == {"argmax", "threshold", "flag_auc"}


def _flag_case(n: int = 600, seed: int = 3):
    """Logits where p(mel) alone cannot tell melanomas from naevi (both ~half melanoma), but the rest of their mass
    can: a naevus keeps it on nv, the commonest class, a melanoma on bkl, as rare as melanoma."""
    rng = np.random.default_rng(seed)
    y = np.where(rng.random(n) < 0.2, MEL_INDEX, CLASS_CODES.index("nv"))
    z = rng.normal(0, 0.3, (n, len(CLASS_CODES)))
    z[:, MEL_INDEX] += 2.0
    z[np.arange(n), np.where(y == MEL_INDEX, CLASS_CODES.index("bkl"), CLASS_CODES.index("nv"))] += 2.0
    log_prior = np.log(np.array([0.03, 0.05, 0.11, 0.01, 0.11, 0.67, 0.02]))
    return z, y, log_prior


def test_flag_shift_is_chosen_where_it_raises_fewest_alarms_and_the_bundle_scores_the_same():
    z, y, log_prior = _flag_case()
    mel = y == MEL_INDEX
    flag = choose_flag(z, y, 1.0, log_prior, 0.90)
    by_shift = {g["shift"]: g for g in flag.grid}
    assert flag.shift > 0 and flag.offsets and len(flag.offsets) == len(CLASS_CODES)
    assert by_shift[flag.shift]["specificity"] == max(g["specificity"] for g in flag.grid)
    assert by_shift[flag.shift]["specificity"] > by_shift[0.0]["specificity"] + 0.2  # the case is built for it
    score = mel_flag_scores(z, 1.0, flag.offsets)
    assert binary_rates(score, mel, flag.threshold)["recall"] >= 0.90
    # the runtime's score, from calibrated probabilities, is the one chosen on logits
    for t in (1.0, 0.5):
        b = ModelBundle("m", PreprocessSpec(64), temperature=t, mel_flag_offsets=flag.offsets)
        np.testing.assert_allclose(b.mel_score(softmax(z, t)), mel_flag_scores(z, t, flag.offsets), atol=1e-9)
    # no shift on the grid: no offsets, and the flag is p(mel)
    plain = choose_flag(z, y, 1.0, log_prior, 0.90, shifts=(0.0,))
    assert plain.offsets == () and plain.threshold == threshold_for_sensitivity(softmax(z)[:, MEL_INDEX], mel, 0.90)
    s = summarize(z, y, 1.0, flag.threshold, flag.offsets)
    assert s["melanoma"]["threshold"]["recall"] >= 0.90 and s["melanoma"]["flag_auc"] > auc_binary(softmax(z)[:, MEL_INDEX], mel)
