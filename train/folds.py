"""Cross-fitting folds of the training split, by lesion: teachers whose targets a student can learn from.

A teacher fitted on an image predicts almost its label there, so its soft targets on its own training images add
little to the labels. k teachers, each trained without one fold, give every training image a target from a model
that never saw it. Folds group whole lesions (HAM10000 holds several images of one lesion: a teacher that saw a
sibling image would know the answer) and are a pure function of the lesion id and k, so they need no manifest.
"""
from __future__ import annotations

import hashlib

import numpy as np

from dermtrain.data import Record


def lesion_fold(lesion_id: str, folds: int) -> int:
    digest = hashlib.sha256(f"fold:{lesion_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % folds


def fold_of(records: list[Record], folds: int) -> np.ndarray:
    """The fold (0..folds-1) of each record."""
    return np.array([lesion_fold(r.lesion_id, folds) for r in records], dtype=np.int64)


def valid_holdout(holdout) -> bool:
    """(fold, folds) with integer folds >= 2 and 0 <= fold < folds."""
    return (len(holdout) == 2 and all(type(v) is int for v in holdout)
            and holdout[1] >= 2 and 0 <= holdout[0] < holdout[1])


def parse_holdout(text: str) -> tuple[int, int]:
    """'FOLD/FOLDS' (e.g. '0/3') -> (0, 3); ValueError with a one-line message otherwise."""
    try:
        fold, folds = (int(t) for t in text.split("/"))
    except ValueError:
        raise ValueError(f"{text!r}: expected FOLD/FOLDS, e.g. 0/3") from None
    if not valid_holdout((fold, folds)):
        raise ValueError(f"{text!r}: needs FOLDS >= 2 and 0 <= FOLD < FOLDS")
    return fold, folds


def held_out(records: list[Record], holdout: tuple[int, int] | None) -> np.ndarray:
    """Which training records a run with this holdout does not fit (none without one)."""
    if holdout is None:
        return np.zeros(len(records), bool)
    fold, folds = holdout
    return fold_of(records, folds) == fold


def fitted_indices(records: list[Record], holdout: tuple[int, int] | None) -> np.ndarray:
    """Indices of the training records a run fits: all, or all outside its held-out fold."""
    return np.flatnonzero(~held_out(records, holdout))
