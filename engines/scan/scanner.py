"""The scan: decode and preprocess in worker threads (bounded), infer in batches, append rows per batch."""
from __future__ import annotations

import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from engines.engine import Engine
from engines.imageio import ImageReadError, check_content, load_rgb
from engines.preprocess import PreprocessSpec, normalize, resize_for_model
from engines.scan.results import ResultsWriter, Row, one_line, row_name


@dataclass
class ScanStats:
    total: int = 0  # images to scan in this run
    ok: int = 0
    errors: int = 0
    flagged: int = 0
    seconds: float = 0.0

    def add(self, rows: list[Row]) -> None:
        for r in rows:
            ok = r.status == "ok"
            self.ok += ok
            self.errors += not ok
            self.flagged += ok and r.melanoma_flag

    @property
    def images_per_s(self) -> float:
        return (self.ok + self.errors) / self.seconds if self.seconds > 0 else 0.0


def load_one(path: Path, spec: PreprocessSpec):
    """file -> (uint8 size x size x 3, resized as the model wants, (w, h), None), or (None, None, one-line error).
    Never raises: a scan never stops for one file. The plain and the Ray scan both read files here."""
    try:
        rgb = load_rgb(path)
        check_content(rgb, str(path))
        return resize_for_model(rgb, spec), (rgb.shape[1], rgb.shape[0]), None
    except ImageReadError as e:
        return None, None, one_line(str(e))
    except MemoryError:
        return None, None, one_line(f"{path}: not enough memory to decode")
    except Exception as e:  # noqa: BLE001
        return None, None, one_line(f"{path}: {type(e).__name__}: {e}")


def classify_rows(engine: Engine, items: list[tuple[str, np.ndarray, tuple[int, int]]], tta: str) -> list[Row]:
    """(relative name, resized uint8 image, (w, h)) items -> one result row each, in order."""
    if not items:
        return []
    spec, codes = engine.bundle.preprocess, engine.bundle.classes
    thr = engine.bundle.threshold_for(tta)
    probs, _ = engine.infer(normalize(np.stack([x for _, x, _ in items]), spec), tta)
    scores = engine.bundle.mel_score(probs)
    rows = []
    for (rel, _, (w, h)), p, score in zip(items, probs, scores):
        if not np.isfinite(p).all():
            rows.append(Row(rel, "error", f"{rel}: the model gave non-finite probabilities for this image"))
            continue
        i = int(p.argmax())
        rows.append(Row(rel, "ok", "", codes[i], float(p[i]), tuple(float(v) for v in p), float(score),
                        bool(score >= thr), w, h))
    return rows


def scan(files: list[Path], folder: Path, engine: Engine, writer: ResultsWriter, batch: int = 32,
         tta: str = "none", workers: int = 0, progress: bool = True) -> ScanStats:
    stats = ScanStats(total=len(files))
    workers = workers or max(2, min(4, os.cpu_count() or 2))
    window = batch * 2  # at most this many decoded images wait in memory
    t0 = time.perf_counter()
    bar = tqdm(total=len(files), unit="img", desc="scanning", disable=not progress, smoothing=0.1)

    def flush(items: list[tuple[str, np.ndarray, tuple[int, int]]], errors: list[Row]) -> None:
        rows = errors + classify_rows(engine, items, tta)
        writer.append(rows)
        stats.add(rows)
        bar.update(len(rows))
        bar.set_postfix(img_s=f"{(stats.ok + stats.errors) / (time.perf_counter() - t0):.0f}", errors=stats.errors)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque = deque()
        it = iter(files)
        items: list = []
        errors: list[Row] = []
        while True:
            while len(pending) < window:
                nxt = next(it, None)
                if nxt is None:
                    break
                pending.append((nxt, pool.submit(load_one, nxt, engine.bundle.preprocess)))
            if not pending:
                break
            path, fut = pending.popleft()
            x, size, err = fut.result()
            rel = row_name(path, folder)
            if err is not None:
                errors.append(Row(rel, "error", err))
            else:
                items.append((rel, x, size))
            if len(items) >= batch or len(errors) >= batch:
                flush(items, errors)
                items, errors = [], []
        flush(items, errors)
    bar.close()
    stats.seconds = time.perf_counter() - t0
    return stats
