from collections import defaultdict

import pytest

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
