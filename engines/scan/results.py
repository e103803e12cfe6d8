"""The results CSV: appended and flushed batch by batch, readable after any kill, resumable, never mixed.

- Every cell is printable UTF-8: a file name that is not valid UTF-8 is written with \\xNN escapes.
- Cells a spreadsheet would run as a formula (= + - @, tab, CR) get a leading apostrophe, as spreadsheet tools
  expect; a name starting with an apostrophe gets one more, so reading strips exactly one and names round-trip.
- Rows end in CRLF (RFC 4180), so a CR or LF inside a name is quoted, never a row break.
- A sidecar `OUT.json` records the model (sha256), the folder and the options; `--resume` appends only when
  they match, after dropping error rows (those files are tried again) and any row cut by a crash.
"""
from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import asdict, dataclass
from collections import Counter
from pathlib import Path, PurePosixPath

from engines.fsutil import atomic_path
from engines.labels import CLASS_CODES

COLUMNS = ("file", "status", "error", "label", "confidence", *CLASS_CODES, "melanoma_score", "melanoma_flag", "width",
           "height")
ISIC_COLUMNS = ("image", "MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC")
FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "'")
SIDECAR_FORMAT = 2  # 2: the melanoma_score column


class OutputError(Exception):
    """An output that cannot be written or resumed; str() is one line."""


def printable(text: str) -> str:
    """A str that encodes as UTF-8: undecodable bytes of a file name (surrogate escapes) become \\xNN."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def row_name(path: Path, folder: Path) -> str:
    """How a file of the scanned folder is named in the results: its relative path, printable."""
    return printable(path.relative_to(folder).as_posix())


def neutralise(cell: str) -> str:
    return "'" + cell if cell.startswith(FORMULA_START) else cell


def restore(cell: str) -> str:
    return cell[1:] if cell.startswith("'") else cell


def one_line(text: str) -> str:
    return " ".join(printable(str(text)).split())


@dataclass(frozen=True)
class Row:
    file: str  # relative path as written (printable)
    status: str  # ok | error
    error: str = ""
    label: str = ""
    confidence: float | None = None
    probs: tuple[float, ...] = ()
    melanoma_score: float = 0.0  # what the flag compares with the threshold (p(mel) for bundles without flag offsets)
    melanoma_flag: bool = False
    width: int = 0
    height: int = 0

    def cells(self) -> list[str]:
        name = neutralise(self.file)
        if self.status != "ok":
            return [name, self.status, neutralise(one_line(self.error)), *[""] * (len(COLUMNS) - 3)]
        return [name, "ok", "", self.label, f"{self.confidence:.6f}", *(f"{p:.6f}" for p in self.probs),
                f"{self.melanoma_score:.6f}", "1" if self.melanoma_flag else "0", str(self.width), str(self.height)]

    @classmethod
    def from_cells(cls, c: list[str]) -> "Row":
        d = dict(zip(COLUMNS, c))
        if d["status"] != "ok":
            return cls(restore(d["file"]), d["status"], restore(d["error"]))
        return cls(restore(d["file"]), "ok", "", d["label"], float(d["confidence"]),
                   tuple(float(d[k]) for k in CLASS_CODES), float(d["melanoma_score"]), d["melanoma_flag"] == "1",
                   int(d["width"] or 0), int(d["height"] or 0))


@dataclass(frozen=True)
class ScanIdentity:
    """What makes rows of one results file comparable: resuming with anything else would mix results."""
    model_sha256: str
    model: str
    folder: str  # absolute
    recursive: bool
    tta: str
    mel_threshold: float
    format: int = SIDECAR_FORMAT

    def differences(self, other: "ScanIdentity") -> list[str]:
        names = {"model_sha256": "model (ONNX sha256)", "folder": "folder", "recursive": "--recursive",
                 "tta": "--tta", "mel_threshold": "melanoma threshold", "format": "file format"}
        return [label for k, label in names.items() if getattr(self, k) != getattr(other, k)]


def sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _serialise(rows: list[list[str]]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\r\n").writerows(rows)
    return buf.getvalue()


def _parse(text: str) -> tuple[list[list[str]], int]:
    """(complete records, characters they span). A record cut by a crash (short, or inside an open quote) ends
    the list: everything from it on is the damaged tail."""
    records, end = [], 0
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        for rec in reader:
            records.append(rec)
    except csv.Error:
        pass
    # keep only whole rows whose serialisation is exactly the next part of the file
    kept: list[list[str]] = []
    for rec in records:
        s = _serialise([rec])
        if len(rec) != len(records[0]) or not text.startswith(s, end):
            break
        kept.append(rec)
        end += len(s)
    return kept, end


def is_results_file(path: Path) -> bool:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            return tuple(next(csv.reader(f), ())) == COLUMNS
    except (OSError, UnicodeDecodeError, csv.Error):
        return False


def read_results(path: Path) -> list[Row]:
    """Rows of a results file, one per file (the last one wins), damaged tail ignored."""
    if not path.is_file():
        return []
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise OutputError(f"{path}: not a dermscan results file (not UTF-8 text)") from None
    records, _ = _parse(text)
    if not records or tuple(records[0]) != COLUMNS:
        raise OutputError(f"{path}: exists but is not a dermscan results file; pick another --out")
    rows: dict[str, Row] = {}
    for rec in records[1:]:
        try:
            r = Row.from_cells(rec)
        except (KeyError, ValueError):
            continue
        rows.pop(r.file, None)
        rows[r.file] = r
    return list(rows.values())


class ResultsWriter:
    """Each batch goes out as one write() followed by flush and fsync: a kill loses at most the batch in flight.

    Opening for resume first rewrites the file (atomically) as its whole ok rows only: a crash's cut row and the
    earlier error rows go, so a file that failed before is tried again and never appears twice."""

    def __init__(self, path: Path, identity: ScanIdentity, resume: bool):
        self.path = path
        self.done: set[str] = set()  # files whose results a resumed file already holds
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if resume and path.is_file():
                check_resume(path, identity)
                keep = [r for r in read_results(path) if r.status == "ok"]
                self.done = {r.file for r in keep}
                with atomic_path(path) as tmp:
                    tmp.write_bytes(_serialise([list(COLUMNS), *(r.cells() for r in keep)]).encode("utf-8"))
                self.f = open(path, "a", newline="", encoding="utf-8")
            else:
                self.f = open(path, "w", newline="", encoding="utf-8")
                self._write([list(COLUMNS)])
            from engines.fsutil import write_json
            write_json(sidecar(path), asdict(identity))
        except OSError as e:
            raise OutputError(f"{path}: cannot write results ({e.strerror or e})") from None

    def _write(self, rows: list[list[str]]) -> None:
        try:
            self.f.write(_serialise(rows))
            self.f.flush()
            os.fsync(self.f.fileno())
        except OSError as e:
            raise OutputError(f"{self.path}: cannot write results ({e.strerror or e})") from None

    def append(self, rows: list[Row]) -> None:
        if rows:
            self._write([r.cells() for r in rows])

    def close(self) -> None:
        try:
            self.f.close()
        except OSError as e:
            raise OutputError(f"{self.path}: cannot write results ({e.strerror or e})") from None


def check_resume(path: Path, identity: ScanIdentity) -> None:
    side = sidecar(path)
    if not side.is_file():
        raise OutputError(f"{path}: has no {side.name} saying which model and folder produced it; "
                          f"cannot resume it safely (scan into a new --out)")
    try:
        saved = ScanIdentity(**json.loads(side.read_text(encoding="utf-8")))
    except (ValueError, TypeError) as e:
        raise OutputError(f"{side}: unreadable ({one_line(e)}); cannot resume safely") from None
    diff = identity.differences(saved)
    if diff:
        raise OutputError(f"{path}: was written with another {', '.join(diff)}; resuming would mix results "
                          f"(scan into a new --out, or resume with the same model, folder and options)")


def isic_ids(rows: list[Row]) -> dict[str, str]:
    """file -> ISIC image id: the file's stem (ISIC_0024306), or its whole relative path where stems collide
    (a/img.jpg and b/img.jpg, or img.jpg and img.png): ids are always unique."""
    stems = Counter(PurePosixPath(r.file).stem for r in rows)
    return {r.file: PurePosixPath(r.file).stem if stems[PurePosixPath(r.file).stem] == 1 else r.file for r in rows}


def write_isic(rows: list[Row], path: Path) -> None:
    """The ISIC challenge submission format: image, MEL, NV, BCC, AKIEC, BKL, DF, VASC."""
    ok = [r for r in rows if r.status == "ok"]
    ids = isic_ids(ok)
    idx = {c: CLASS_CODES.index(c.lower()) for c in ISIC_COLUMNS[1:]}
    records = [list(ISIC_COLUMNS)] + [[neutralise(ids[r.file]), *(f"{r.probs[idx[c]]:.6f}" for c in ISIC_COLUMNS[1:])]
                                      for r in ok]
    try:
        with atomic_path(path) as tmp:
            tmp.write_bytes(_serialise(records).encode("utf-8"))
    except OSError as e:
        raise OutputError(f"{path}: cannot write the ISIC file ({e.strerror or e})") from None
