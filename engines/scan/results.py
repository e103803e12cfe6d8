"""The results CSV: appended and flushed batch by batch, readable after any kill, resumable."""
from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass
from pathlib import Path

from engines.labels import CLASS_CODES

COLUMNS = ("file", "status", "error", "label", "confidence", *CLASS_CODES, "melanoma_flag", "width", "height")
ISIC_COLUMNS = ("image", "MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC")


class OutputError(Exception):
    """An output that cannot be written; str() is one line."""


@dataclass(frozen=True)
class Row:
    file: str
    status: str  # ok | error
    error: str = ""
    label: str = ""
    confidence: float | None = None
    probs: tuple[float, ...] = ()
    melanoma_flag: bool = False
    width: int = 0
    height: int = 0

    def cells(self) -> list[str]:
        if self.status != "ok":
            return [self.file, self.status, self.error, "", "", *[""] * len(CLASS_CODES), "", "", ""]
        return [self.file, "ok", "", self.label, f"{self.confidence:.6f}", *(f"{p:.6f}" for p in self.probs),
                "1" if self.melanoma_flag else "0", str(self.width), str(self.height)]

    @classmethod
    def from_dict(cls, d: dict[str, str]) -> "Row":
        if d["status"] != "ok":
            return cls(d["file"], d["status"], d.get("error", ""))
        return cls(d["file"], "ok", "", d["label"], float(d["confidence"]),
                   tuple(float(d[c]) for c in CLASS_CODES), d["melanoma_flag"] == "1",
                   int(d.get("width") or 0), int(d.get("height") or 0))


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def check_writable(path: Path) -> None:
    """Fail before any work when the output cannot be written, rather than after the model has loaded."""
    if path.is_dir():
        raise OutputError(f"{path}: is a folder, not a file")
    parent = path.parent if str(path.parent) else Path(".")
    probe = parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise OutputError(f"{path}: cannot write here (folder {probe} is not writable)")
    if path.exists() and not os.access(path, os.W_OK):
        raise OutputError(f"{path}: file is not writable")


class ResultsWriter:
    """Each batch goes out as one write() followed by flush and fsync: a kill loses at most the batch in
    flight, and a row is either whole or (at the very end, after a crash mid-write) repaired on resume."""

    def __init__(self, path: Path, resume: bool):
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fresh = not (resume and path.is_file() and path.stat().st_size > 0)
            if not fresh:
                _repair_tail(path)
            self.f = open(path, "w" if fresh else "a", newline="", encoding="utf-8")
        except OSError as e:
            raise OutputError(f"{path}: cannot write results ({e.strerror or e})") from None
        if fresh:
            self._write([list(COLUMNS)])

    def _write(self, rows: list[list[str]]) -> None:
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows(rows)
        self.f.write(buf.getvalue())
        self.f.flush()
        os.fsync(self.f.fileno())

    def append(self, rows: list[Row]) -> None:
        if rows:
            self._write([r.cells() for r in rows])

    def close(self) -> None:
        self.f.close()


def _repair_tail(path: Path) -> None:
    """Cut a partial last line (a kill during a write) so the file is whole rows again."""
    with open(path, "rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)


def read_results(path: Path) -> list[Row]:
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ())[:len(COLUMNS)] != COLUMNS:
            raise OutputError(f"{path}: exists but is not a dermscan results file; pick another --out")
        rows = []
        for d in reader:
            try:
                rows.append(Row.from_dict(d))
            except (KeyError, ValueError, TypeError):
                continue  # a row cut by a crash: scanned again on resume
    return rows


def write_isic(rows: list[Row], path: Path) -> None:
    """The ISIC challenge submission format: image, MEL, NV, BCC, AKIEC, BKL, DF, VASC."""
    from engines.fsutil import atomic_path

    idx = {c: CLASS_CODES.index(c.lower()) for c in ISIC_COLUMNS[1:]}
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(ISIC_COLUMNS)
        for r in rows:
            if r.status == "ok":
                w.writerow([Path(r.file).stem, *(f"{r.probs[idx[c]]:.6f}" for c in ISIC_COLUMNS[1:])])
