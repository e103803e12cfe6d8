"""One rule for showing probabilities and the melanoma threshold, everywhere (viewer, HTML report, cards).

The threshold is a whole number of hundredths of a percent (the bundle snaps it down, which can only raise the
sensitivity it was chosen for), shown with two decimals; probabilities are shown rounded down to two decimals.
So a flagged image never shows a number below the threshold beside it, and an unflagged one never shows the
threshold or more: p >= t exactly when floor(p) >= t.
"""
from __future__ import annotations

import math

THRESHOLD_STEP = 1e-4  # 0.01 percentage points


def snap_threshold(t: float) -> float:
    """The threshold rounded down to THRESHOLD_STEP (a tiny tolerance keeps 0.0949 at 0.0949)."""
    return math.floor(t / THRESHOLD_STEP + 1e-6) * THRESHOLD_STEP


def pct(p: float) -> str:
    """A probability as a percentage, rounded down to two decimals: 0.094999 -> '9.49%'."""
    return f"{math.floor(p * 10_000 + 1e-9) / 100:.2f}%"
