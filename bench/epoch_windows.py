"""Runs of one schedule compared at equal epochs: mean validation balanced accuracy over windows of epochs.

One run's best epoch is a noisy pick (a student's validation score moves 1-3 points from one epoch to the next);
at equal epochs two runs of one schedule see the same learning rate, so a lead held in every window says more.

    python bench/epoch_windows.py runs/convnext-hint runs/convnext-hint-ema [--windows 3-8,8-13,14-18,19-24,25-30]

Reads each run's history.json (validation split only) and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def parse_windows(text: str) -> list[tuple[int, int]]:
    out = []
    for part in text.split(","):
        a, _, b = part.partition("-")
        try:
            lo, hi = int(a), int(b or a)
        except ValueError:
            lo = hi = 0
        if lo < 1 or hi < lo:
            raise ValueError(f"--windows: {part!r} is not a range of epochs such as 3-8")
        out.append((lo, hi))
    return out


def window_means(history: list[dict], windows: list[tuple[int, int]]) -> list[float | None]:
    by_epoch = {h["epoch"]: h["val_balanced_acc"] for h in history}
    means = []
    for lo, hi in windows:
        vals = [by_epoch[e] for e in range(lo, hi + 1) if e in by_epoch]
        means.append(sum(vals) / len(vals) if len(vals) == hi - lo + 1 else None)
    return means


def table(runs: list[Path], windows: list[tuple[int, int]]) -> str:
    head = ["run"] + [f"epochs {lo}-{hi}" for lo, hi in windows] + ["best (epoch)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run in runs:
        hist = json.loads((run / "history.json").read_text())
        cells = [f"{100 * m:.1f}%" if m is not None else "-" for m in window_means(hist, windows)]
        best = max(hist, key=lambda h: h["val_balanced_acc"])
        lines.append(f"| {run} | " + " | ".join(cells) + f" | {100 * best['val_balanced_acc']:.1f}% ({best['epoch']}) |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path, help="run folders with a history.json")
    ap.add_argument("--windows", default="3-8,8-13,14-18,19-24,25-30", help="inclusive epoch ranges, comma-separated")
    a = ap.parse_args()
    try:
        windows = parse_windows(a.windows)
        for run in a.runs:
            if not (run / "history.json").is_file():
                raise ValueError(f"{run}: no history.json (not a run folder, or no epoch finished yet)")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table(a.runs, windows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
