from collections import defaultdict

import numpy as np
import pytest

from dermtrain.config import ConfigError, from_dict, load_config
from dermtrain.splits import SPLITS, make_split, read_manifest, select, split_counts, write_manifest
from engines.labels import CLASS_CODES


@pytest.mark.parametrize("seed", [0, 1, 7, 2024])
def test_no_lesion_crosses_splits_and_every_class_everywhere(records, seed):
    rows = make_split(records, seed=seed)
    assert len(rows) == len(records) == 10015
    where = defaultdict(set)
    for r in rows:
        where[r.lesion_id].add(r.split)
    assert all(len(s) == 1 for s in where.values())
    counts = split_counts(rows)
    for s in SPLITS:
        for c in CLASS_CODES:
            assert counts[s][c] > 0, (s, c)
    n = {s: sum(counts[s].values()) for s in SPLITS}
    assert abs(n["train"] / 10015 - 0.70) < 0.01 and abs(n["test"] / 10015 - 0.15) < 0.01


def test_split_is_seeded_and_round_trips(records, tmp_path):
    a, b, c = make_split(records, seed=3), make_split(records, seed=3), make_split(records, seed=4)
    assert a == b and a != c
    write_manifest(a, tmp_path / "m.csv")
    assert read_manifest(tmp_path / "m.csv") == a
    header = (tmp_path / "m.csv").read_text().splitlines()[0]
    assert header == "image_id,lesion_id,dx,split"


def test_limit_keeps_every_class(records, split_csv):
    rows = read_manifest(split_csv)
    sub = select(rows, records, "val", limit=60, seed=0)
    assert len(sub) <= 60 and {r.dx for r in sub} == set(CLASS_CODES)


def test_cross_fitting_folds_keep_lesions_whole(records):
    from dermtrain.folds import fitted_indices, fold_of, parse_holdout
    folds = fold_of(records, 3)
    by_lesion: dict[str, set] = {}
    for r, f in zip(records, folds):
        by_lesion.setdefault(r.lesion_id, set()).add(int(f))
    assert all(len(s) == 1 for s in by_lesion.values())  # a teacher never sees a sibling image of its fold
    share = np.bincount(folds, minlength=3) / len(records)
    assert share.min() > 0.28 and share.max() < 0.39
    assert (fold_of(records[::-1], 3) == folds[::-1]).all()  # a function of the lesion, not of the order
    kept = fitted_indices(records, (1, 3))
    assert len(kept) == (folds != 1).sum() and (folds[kept] != 1).all()
    assert len(fitted_indices(records, None)) == len(records)
    assert parse_holdout("2/3") == (2, 3)
    for bad in ("3/3", "x", "1/1", "0/3/4"):
        with pytest.raises(ValueError, match="FOLD"):
            parse_holdout(bad)
    base = load_config("lite0-bank").to_dict()
    for bad in ([0.5, 3], [3, 3], "0/3", [0, 3, 1]):
        with pytest.raises(ConfigError, match="holdout"):
            from_dict({**base, "recipe": {**base["recipe"], "holdout": bad}})
    assert from_dict({**base, "recipe": {**base["recipe"], "holdout": [2, 3]}}).recipe.holdout == (2, 3)
