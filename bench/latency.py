"""CPU batch-1 latency of model bundles as the viewer runs them (ONNX Runtime, one image per call), measured in
interleaved rounds so that a noisy machine slows every model alike: one round times each model in turn.

    python bench/latency.py engines/models/efficientnet_lite0.onnx old.onnx [--rounds 5] [--runs 100] [--threads 2]

Prints, per model, the median of its round medians and their range, in milliseconds.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np


def round_medians(paths: list[Path], rounds: int = 5, runs: int = 100, threads: int = 2,
                  max_batch: int = 1) -> dict[Path, list[float]]:
    """Each model's median latency (ms) in each round; models are opened as the viewer opens them (max_batch=1)
    unless `max_batch` says otherwise (dermscan's engine keeps the batch dimension free)."""
    from engines.onnx_backend import OrtEngine
    engines = {p: OrtEngine(p, "cpu", threads=threads, max_batch=max_batch) for p in paths}
    inputs = {p: np.random.default_rng(0).normal(size=(1, 3, e.bundle.preprocess.size, e.bundle.preprocess.size))
              .astype(np.float32) for p, e in engines.items()}
    out: dict[Path, list[float]] = {p: [] for p in paths}
    for _ in range(rounds):
        for p, eng in engines.items():
            for _ in range(10):
                eng.run(inputs[p])
            times = []
            for _ in range(runs):
                t0 = time.perf_counter()
                eng.run(inputs[p])
                times.append((time.perf_counter() - t0) * 1000)
            out[p].append(float(np.median(times)))
    return out


def latency_ms(path: Path, rounds: int = 3, runs: int = 100, threads: int = 2) -> float:
    """One model's batch-1 latency: the median of its round medians."""
    return float(np.median(round_medians([Path(path)], rounds, runs, threads)[Path(path)]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", type=Path, help="ONNX bundles")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--runs", type=int, default=100, help="timed calls per model per round")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-batch", type=int, default=1,
                    help="open the engines for this batch size (1: the viewer's; larger: dermscan's, batch left free)")
    a = ap.parse_args()
    res = round_medians(a.models, a.rounds, a.runs, a.threads, a.max_batch)
    print(f"| model | batch-1 latency, median of {a.rounds} round medians | range | threads | engine max_batch |")
    print("|---|---|---|---|---|")
    for p, meds in res.items():
        print(f"| {p} | {np.median(meds):.2f} ms | {min(meds):.2f}-{max(meds):.2f} ms | {a.threads} | {a.max_batch} |")


if __name__ == "__main__":
    main()
