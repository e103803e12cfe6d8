"""Classification metrics for the clinic: per-class table, balanced accuracy, AUC, calibration, melanoma
operating points. numpy only, so evaluation and the conversion gate share one implementation."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from engines.display import snap_threshold
from engines.engine import softmax  # noqa: F401 - metrics and runtime calibrate with one softmax
from engines.labels import CLASS_CODES, MEL_INDEX, class_name

K = len(CLASS_CODES)


def confusion(y_true: np.ndarray, y_pred: np.ndarray, k: int = K) -> np.ndarray:
    """Rows: true class, columns: predicted class."""
    cm = np.zeros((k, k), dtype=np.int64)
    np.add.at(cm, (np.asarray(y_true), np.asarray(y_pred)), 1)
    return cm


def recalls(cm: np.ndarray) -> np.ndarray:
    tot = cm.sum(axis=1)
    return np.divide(np.diag(cm), tot, out=np.full(len(cm), np.nan), where=tot > 0)


def balanced_accuracy(cm: np.ndarray) -> float:
    r = recalls(cm)
    return float(np.nanmean(r))


def macro_f1(cm: np.ndarray) -> float:
    tp = np.diag(cm).astype(float)
    prec = np.divide(tp, cm.sum(axis=0), out=np.zeros(len(cm)), where=cm.sum(axis=0) > 0)
    rec = np.divide(tp, cm.sum(axis=1), out=np.zeros(len(cm)), where=cm.sum(axis=1) > 0)
    f1 = np.divide(2 * prec * rec, prec + rec, out=np.zeros(len(cm)), where=(prec + rec) > 0)
    present = cm.sum(axis=1) > 0
    return float(f1[present].mean())


def auc_binary(scores: np.ndarray, positive: np.ndarray) -> float:
    """ROC AUC by the rank-sum (Mann-Whitney) statistic, ties counted half."""
    pos = positive.astype(bool)
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    s = scores[order]
    ranks = np.empty(len(s))
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and s[j + 1] == s[i]:
            j += 1
        ranks[i:j + 1] = (i + j) / 2 + 1
        i = j + 1
    r = np.empty(len(s))
    r[order] = ranks
    return float((r[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def expected_calibration_error(probs: np.ndarray, y_true: np.ndarray, bins: int = 15) -> float:
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y_true
    edges = np.linspace(0, 1, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            ece += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(ece)


def nll(logits: np.ndarray, y_true: np.ndarray, temperature: float = 1.0) -> float:
    p = softmax(logits, temperature)
    return float(-np.log(np.clip(p[np.arange(len(y_true)), y_true], 1e-12, None)).mean())


def fit_temperature(logits: np.ndarray, y_true: np.ndarray) -> float:
    """The temperature minimising validation NLL, by golden-section search on log T in [-3, 3]."""
    a, b = -3.0, 3.0
    g = (math.sqrt(5) - 1) / 2
    c, d = b - g * (b - a), a + g * (b - a)
    for _ in range(60):
        if nll(logits, y_true, math.exp(c)) < nll(logits, y_true, math.exp(d)):
            b = d
        else:
            a = c
        c, d = b - g * (b - a), a + g * (b - a)
    return float(math.exp((a + b) / 2))


def threshold_for_sensitivity(p_pos: np.ndarray, positive: np.ndarray, target: float = 0.90) -> float:
    """The most specific threshold t with recall(p >= t) >= target.

    t sits halfway between the k-th highest positive score and the next lower score of any image, so that no
    image lies on the threshold: numeric noise between backends (PyTorch, ONNX Runtime, FP16) cannot flip
    a validation decision."""
    pos = positive.astype(bool)
    scores = np.sort(p_pos[pos])[::-1]
    if len(scores) == 0:
        return 0.5
    k = max(1, math.ceil(target * len(scores)))
    top = float(scores[k - 1])
    below = p_pos[p_pos < top]
    t = (top + float(below.max())) / 2 if len(below) else top
    return snap_threshold(t)  # rounded down: shown exactly, and at least as sensitive


# Shares of the training log-prior the melanoma flag may add to the calibrated logits (0: the bars' own p(mel)).
FLAG_SHIFTS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)


def mel_flag_scores(logits: np.ndarray, temperature: float = 1.0, offsets=()) -> np.ndarray:
    """The melanoma flag's score of each image: softmax(logits / T + offsets)[mel]; the runtime computes the same
    from calibrated probabilities (engines.bundle.ModelBundle.mel_score)."""
    z = np.asarray(logits, np.float64) / temperature
    if len(offsets):
        z = z + np.asarray(offsets, np.float64)
    return softmax(z)[:, MEL_INDEX]


def flag_threshold(val_logits: np.ndarray, val_labels: np.ndarray, temperature: float, offsets,
                   target: float = 0.90) -> float:
    """The threshold on the flag's score (with these offsets) that keeps `target` of the validation melanomas."""
    return threshold_for_sensitivity(mel_flag_scores(val_logits, temperature, offsets), val_labels == MEL_INDEX, target)


@dataclass(frozen=True)
class FlagChoice:
    """The melanoma flag's operating point: its offsets (shift x log-prior) and the threshold on its score."""
    shift: float | None  # None: read from a bundle, which keeps only the offsets
    offsets: tuple[float, ...]
    threshold: float
    grid: tuple[dict, ...]  # every shift tried: its threshold, validation specificity and melanoma AUC


def choose_flag(val_logits: np.ndarray, val_labels: np.ndarray, temperature: float, log_prior: np.ndarray,
                target: float = 0.90, shifts=FLAG_SHIFTS) -> FlagChoice:
    """The shift of the flag's logits towards the training prior that raises the fewest validation alarms at the
    target melanoma sensitivity (ties: the better melanoma AUC, then the smaller shift), and its threshold."""
    mel = val_labels == MEL_INDEX
    grid = []
    for b in shifts:
        score = mel_flag_scores(val_logits, temperature, b * log_prior)
        thr = threshold_for_sensitivity(score, mel, target)
        grid.append({"shift": float(b), "threshold": thr, "specificity": binary_rates(score, mel, thr)["specificity"],
                     "auc": auc_binary(score, mel)})
    best = max(grid, key=lambda g: (np.nan_to_num(g["specificity"], nan=-1.0), np.nan_to_num(g["auc"], nan=-1.0),
                                    -g["shift"]))
    offsets = tuple(round(float(v), 6) for v in best["shift"] * np.asarray(log_prior, np.float64))
    if best["shift"] == 0:
        offsets = ()
    # the threshold again on the rounded offsets the bundle will carry, so what was chosen is what runs
    return FlagChoice(best["shift"], offsets, flag_threshold(val_logits, val_labels, temperature, offsets, target),
                      tuple(grid))


def binary_rates(p_pos: np.ndarray, positive: np.ndarray, threshold: float) -> dict:
    pos = positive.astype(bool)
    flag = p_pos >= threshold
    tp, fn = int((flag & pos).sum()), int((~flag & pos).sum())
    tn, fp = int((~flag & ~pos).sum()), int((flag & ~pos).sum())
    return {"threshold": float(threshold),
            "recall": tp / (tp + fn) if tp + fn else float("nan"),
            "specificity": tn / (tn + fp) if tn + fp else float("nan"),
            "tp": tp, "fn": fn, "tn": tn, "fp": fp}


def melanoma_at_argmax(cm: np.ndarray) -> dict:
    m = MEL_INDEX
    tp = int(cm[m, m])
    fn = int(cm[m].sum() - tp)
    fp = int(cm[:, m].sum() - tp)
    tn = int(cm.sum() - tp - fn - fp)
    return {"recall": tp / (tp + fn) if tp + fn else float("nan"),
            "specificity": tn / (tn + fp) if tn + fp else float("nan"),
            "tp": tp, "fn": fn, "tn": tn, "fp": fp}


def class_table(cm: np.ndarray) -> list[dict]:
    """The published per-class table: correct / total, accuracy, most common confusion with count and share."""
    rows = []
    for i, code in enumerate(CLASS_CODES):
        total = int(cm[i].sum())
        off = cm[i].copy()
        off[i] = 0
        j = int(off.argmax())
        rows.append({
            "code": code, "name": class_name(code), "correct": int(cm[i, i]), "total": total,
            "accuracy": cm[i, i] / total if total else float("nan"),
            "confused_with": CLASS_CODES[j] if off[j] > 0 else None,
            "confused_count": int(off[j]),
            "confused_share": off[j] / total if total else float("nan"),
        })
    return rows


def summarize(logits: np.ndarray, y_true: np.ndarray, temperature: float = 1.0,
              mel_threshold: float | None = None, mel_offsets=()) -> dict:
    """Every headline figure for one split, from its logits; the melanoma flag at `mel_threshold` on its own score
    (`mel_flag_scores` with `mel_offsets`)."""
    probs = softmax(logits, temperature)
    pred = probs.argmax(axis=1)
    cm = confusion(y_true, pred)
    rec = recalls(cm)
    out = {
        "n": int(len(y_true)),
        "accuracy": float((pred == y_true).mean()) if len(y_true) else float("nan"),
        "balanced_accuracy": balanced_accuracy(cm),
        "macro_f1": macro_f1(cm),
        "per_class": {c: float(rec[i]) for i, c in enumerate(CLASS_CODES)},
        "auc": {c: auc_binary(probs[:, i], y_true == i) for i, c in enumerate(CLASS_CODES)},
        "confusion_matrix": cm.tolist(),
        "class_table": class_table(cm),
        "ece": expected_calibration_error(probs, y_true),
        "melanoma": {"argmax": melanoma_at_argmax(cm)},
    }
    if mel_threshold is not None:
        score = mel_flag_scores(logits, temperature, mel_offsets)
        out["melanoma"]["threshold"] = binary_rates(score, y_true == MEL_INDEX, mel_threshold)
        out["melanoma"]["flag_auc"] = auc_binary(score, y_true == MEL_INDEX)
    return out
