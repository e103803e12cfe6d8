"""Train/val/test splits grouped by lesion and stratified by class, saved as a manifest every step reads."""
from __future__ import annotations

import csv
import hashlib
import os
import random
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

from dermtrain.data import DataError, Record
from engines.labels import CLASS_CODES

SPLITS = ("train", "val", "test")
MANIFEST_COLUMNS = ("image_id", "lesion_id", "dx", "split")


@dataclass(frozen=True)
class SplitRow:
    image_id: str
    lesion_id: str
    dx: str
    split: str


def make_split(records: list[Record], fractions=(0.70, 0.15, 0.15), seed: int = 0) -> list[SplitRow]:
    """Assign whole lesions to splits, class by class, so each split gets its share of every class's images."""
    if abs(sum(fractions) - 1.0) > 1e-6 or len(fractions) != 3:
        raise ValueError(f"split fractions must be three numbers that sum to 1, got {fractions}")
    lesions: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        lesions[r.lesion_id].append(r)
    by_class: dict[str, list[str]] = defaultdict(list)
    for lid, recs in sorted(lesions.items()):
        dxs = {r.dx for r in recs}
        if len(dxs) != 1:
            raise DataError(f"lesion {lid} has images of several classes: {sorted(dxs)}")
        by_class[recs[0].dx].append(lid)

    rng = random.Random(seed)
    assignment: dict[str, str] = {}
    for dx in CLASS_CODES:
        lids = by_class.get(dx, [])
        rng.shuffle(lids)
        total = sum(len(lesions[l]) for l in lids)
        got = [0, 0, 0]
        # Seed each split with one lesion so rare classes appear everywhere, then fill the largest deficit.
        for k, lid in enumerate(lids):
            if k < 3 and len(lids) >= 3:
                i = [2, 1, 0][k]
            else:
                i = max(range(3), key=lambda j: fractions[j] * total - got[j])
            assignment[lid] = SPLITS[i]
            got[i] += len(lesions[lid])
    return [SplitRow(r.image_id, r.lesion_id, r.dx, assignment[r.lesion_id]) for r in records]


def write_manifest(rows: list[SplitRow], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(MANIFEST_COLUMNS)
        for r in rows:
            w.writerow((r.image_id, r.lesion_id, r.dx, r.split))
    os.replace(tmp, path)


def read_manifest(path: Path) -> list[SplitRow]:
    if not Path(path).is_file():
        raise DataError(f"{path}: split manifest not found (make one with `dermtrain split`)")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not set(MANIFEST_COLUMNS) <= set(reader.fieldnames or []):
            raise DataError(f"{path}: not a split manifest (needs columns {', '.join(MANIFEST_COLUMNS)})")
        rows = [SplitRow(r["image_id"], r["lesion_id"], r["dx"], r["split"]) for r in reader]
    bad = [r.split for r in rows if r.split not in SPLITS]
    if bad:
        raise DataError(f"{path}: unknown split name {bad[0]!r}")
    return rows


def manifest_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def split_counts(rows: list[SplitRow]) -> dict[str, dict[str, int]]:
    c = Counter((r.split, r.dx) for r in rows)
    return {s: {dx: c.get((s, dx), 0) for dx in CLASS_CODES} for s in SPLITS}


def format_counts(rows: list[SplitRow]) -> str:
    counts = split_counts(rows)
    head = f"{'split':<6}" + "".join(f"{c:>7}" for c in CLASS_CODES) + f"{'total':>8}{'lesions':>9}"
    lines = [head]
    for s in SPLITS:
        n_les = len({r.lesion_id for r in rows if r.split == s})
        lines.append(f"{s:<6}" + "".join(f"{counts[s][c]:>7}" for c in CLASS_CODES)
                     + f"{sum(counts[s].values()):>8}{n_les:>9}")
    return "\n".join(lines)


def select(rows: list[SplitRow], records: list[Record], split: str, limit: int | None = None,
           seed: int = 0) -> list[Record]:
    """The records of one split, in manifest order; `limit` keeps a class-stratified seeded subset."""
    by_id = {r.image_id: r for r in records}
    missing = [r.image_id for r in rows if r.image_id not in by_id]
    if missing:
        raise DataError(f"split manifest names {len(missing)} images not in the data folder (e.g. {missing[0]})")
    chosen = [by_id[r.image_id] for r in rows if r.split == split]
    if limit is not None and limit < len(chosen):
        chosen = stratified_subset(chosen, limit, seed)
    return chosen


def stratified_subset(records: list[Record], n: int, seed: int) -> list[Record]:
    """n records, every class kept (at least one each where present), proportions roughly kept."""
    rng = random.Random(seed)
    by_dx: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        by_dx[r.dx].append(r)
    quota = {dx: min(len(recs), max(1, round(n * len(recs) / len(records)))) for dx, recs in by_dx.items()}
    while sum(quota.values()) > n and max(quota.values()) > 1:
        quota[max(quota, key=quota.get)] -= 1
    picked = [r for dx, recs in sorted(by_dx.items()) for r in rng.sample(recs, quota[dx])]
    order = {r.image_id: i for i, r in enumerate(records)}
    return sorted(picked, key=lambda r: order[r.image_id])
