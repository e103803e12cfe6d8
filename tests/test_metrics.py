import numpy as np

from dermtrain.metrics import (auc_binary, balanced_accuracy, class_table, confusion, fit_temperature, nll,
                               summarize, threshold_for_sensitivity)


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
    assert set(s["melanoma"]) == {"argmax", "threshold"}
