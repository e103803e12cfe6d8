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
from engines.preprocess import preprocess
from engines.scan.results import ResultsWriter, Row, one_line, printable


@dataclass
class ScanStats:
    total: int = 0  # images to scan in this run
    ok: int = 0
    errors: int = 0
    flagged: int = 0
    seconds: float = 0.0

    @property
    def images_per_s(self) -> float:
        return (self.ok + self.errors) / self.seconds if self.seconds > 0 else 0.0


def _load(path: Path, engine: Engine):
    """Worker: file -> (preprocessed float32 CHW, (w, h)) or the one-line error."""
    try:
        rgb = load_rgb(path)
        check_content(rgb, str(path))
        return preprocess(rgb, engine.bundle.preprocess), (rgb.shape[1], rgb.shape[0]), None
    except ImageReadError as e:
        return None, None, one_line(str(e))
    except MemoryError:
        return None, None, f"{path}: not enough memory to decode"
    except Exception as e:  # noqa: BLE001 - a scan never stops for one file
        return None, None, one_line(f"{path}: {type(e).__name__}: {e}")


def scan(files: list[Path], folder: Path, engine: Engine, writer: ResultsWriter, batch: int = 32,
         tta: str = "none", workers: int = 0, progress: bool = True) -> ScanStats:
    stats = ScanStats(total=len(files))
    workers = workers or max(2, min(4, os.cpu_count() or 2))
    window = batch * 2  # at most this many decoded images wait in memory
    codes = engine.bundle.classes
    mel, thr = engine.bundle.mel_index, engine.bundle.threshold_for(tta)
    t0 = time.perf_counter()
    bar = tqdm(total=len(files), unit="img", desc="scanning", disable=not progress, smoothing=0.1)

    def flush(items: list[tuple[str, np.ndarray, tuple[int, int]]], errors: list[Row]) -> None:
        rows = list(errors)
        if items:
            probs, _ = engine.infer(np.stack([x for _, x, _ in items]), tta)
            for (rel, _, (w, h)), p in zip(items, probs):
                if not np.isfinite(p).all():
                    rows.append(Row(rel, "error", f"{rel}: the model gave non-finite probabilities for this image"))
                    stats.errors += 1
                    continue
                i = int(p.argmax())
                flag = bool(p[mel] >= thr)
                rows.append(Row(rel, "ok", "", codes[i], float(p[i]), tuple(float(v) for v in p), flag, w, h))
                stats.ok += 1
                stats.flagged += flag
        writer.append(rows)
        stats.errors += len(errors)
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
                pending.append((nxt, pool.submit(_load, nxt, engine)))
            if not pending:
                break
            path, fut = pending.popleft()
            x, size, err = fut.result()
            rel = printable(path.relative_to(folder).as_posix())
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
