"""HAM10000 in its official layout: a metadata CSV plus one or more folders of ISIC_*.jpg images."""
from __future__ import annotations

import csv
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from engines.imageio import ImageReadError, is_image_file, load_rgb
from engines.labels import CLASS_CODES

METADATA_NAMES = ("HAM10000_metadata.csv", "HAM10000_metadata", "metadata.csv")


class DataError(Exception):
    """The data folder cannot be used; str() is one line."""


@dataclass(frozen=True)
class Record:
    image_id: str
    lesion_id: str
    dx: str
    path: Path


def resolve_data_dir(data: str | os.PathLike | None) -> Path:
    """`--data`, else $DERM_DATA; a clear error when neither names an existing folder."""
    value = data or os.environ.get("DERM_DATA")
    if not value:
        raise DataError("no data folder: pass --data DIR or set DERM_DATA")
    p = Path(value).expanduser()
    if not p.is_dir():
        raise DataError(f"{p}: data folder does not exist")
    return p


def find_metadata(data_dir: Path) -> Path:
    for name in METADATA_NAMES:
        if (data_dir / name).is_file():
            return data_dir / name
    found = sorted(data_dir.glob("*metadata*.csv"))
    if found:
        return found[0]
    raise DataError(f"{data_dir}: no HAM10000_metadata.csv found")


def index_images(data_dir: Path) -> dict[str, Path]:
    """image_id -> file, over the data folder and its image subfolders (images/, HAM10000_images_part_1/, ...)."""
    index: dict[str, Path] = {}
    folders = [data_dir] + sorted(d for d in data_dir.iterdir() if d.is_dir())
    for folder in folders:
        with os.scandir(folder) as it:
            for entry in it:
                if entry.is_file() and is_image_file(entry.name):
                    index.setdefault(Path(entry.name).stem, Path(entry.path))
    return index


def read_metadata(csv_path: Path) -> list[dict[str, str]]:
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = {"image_id", "lesion_id", "dx"} - set(reader.fieldnames or [])
        if missing:
            raise DataError(f"{csv_path}: missing columns {', '.join(sorted(missing))}")
        return list(reader)


@dataclass
class DataReport:
    data_dir: Path
    metadata: Path
    rows: int = 0
    images_found: int = 0
    missing: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)
    unknown_dx: list[tuple[str, str]] = field(default_factory=list)
    duplicate_ids: list[str] = field(default_factory=list)
    lesions: int = 0
    class_counts: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unreadable or self.unknown_dx or self.duplicate_ids)


def check_data(data_dir: Path, decode: bool = True, progress: bool = True) -> DataReport:
    """Validate a HAM10000 folder: every metadata row has a readable image and a known class."""
    from tqdm import tqdm

    meta = find_metadata(data_dir)
    rows = read_metadata(meta)
    images = index_images(data_dir)
    rep = DataReport(data_dir=data_dir, metadata=meta, rows=len(rows), images_found=len(images))
    seen: set[str] = set()
    for r in rows:
        iid = r["image_id"]
        if iid in seen:
            rep.duplicate_ids.append(iid)
        seen.add(iid)
        if r["dx"] not in CLASS_CODES:
            rep.unknown_dx.append((iid, r["dx"]))
        if iid not in images:
            rep.missing.append(iid)
    rep.lesions = len({r["lesion_id"] for r in rows})
    counts = Counter(r["dx"] for r in rows)
    rep.class_counts = {c: counts.get(c, 0) for c in CLASS_CODES}
    if decode:
        present = [images[r["image_id"]] for r in rows if r["image_id"] in images]
        for path in tqdm(present, desc="decoding", unit="img", disable=not progress):
            try:
                load_rgb(path)
            except ImageReadError as e:
                rep.unreadable.append(str(e))
    return rep


def load_records(data_dir: Path) -> list[Record]:
    """All metadata rows joined to their image files; a DataError names what is wrong."""
    meta = find_metadata(data_dir)
    images = index_images(data_dir)
    records = []
    for r in read_metadata(meta):
        if r["dx"] not in CLASS_CODES:
            raise DataError(f"{meta}: image {r['image_id']} has unknown dx {r['dx']!r}")
        path = images.get(r["image_id"])
        if path is None:
            raise DataError(f"{data_dir}: image file for {r['image_id']} is missing")
        records.append(Record(r["image_id"], r["lesion_id"], r["dx"], path))
    return records
