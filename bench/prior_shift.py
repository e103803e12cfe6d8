"""What the prior shift trades, on validation: the logits of a run's best.pt with a further share of the log-prior added
(or, negative, taken back), from the validation logits `dermtrain eval RUN` saved. The test split is not read.

    python bench/prior_shift.py runs/lite0-f3-kd [--shifts -0.25 -0.125 0 0.125 0.25]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from dermtrain.metrics import summarize


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--shifts", type=float, nargs="+", default=[-0.5, -0.25, -0.125, 0.0, 0.125, 0.25, 0.5, 1.0])
    a = ap.parse_args(argv)
    logits_file, best = a.run / "logits_test.npz", a.run / "best.pt"
    for f, hint in ((logits_file, f"run `dermtrain eval {a.run}` first"), (best, "has the run finished an epoch?")):
        if not f.is_file():
            print(f"prior_shift: {f}: not found ({hint})", file=sys.stderr)
            return 2
    d = np.load(logits_file)
    z, y = d["val_logits"], d["val_labels"]
    state = torch.load(best, map_location="cpu", weights_only=False)
    if "log_prior" not in state:
        print(f"prior_shift: {best}: not a recipe run (no log_prior in the checkpoint)", file=sys.stderr)
        return 2
    log_prior = np.asarray(state["log_prior"], np.float32)
    print(f"{a.run}: prior shift {state['prior_shift']:g} folded into best.pt; validation, n={len(y)}")
    print("| further shift | balanced accuracy | accuracy | melanoma recall (argmax) |")
    print("|---|---|---|---|")
    for b in a.shifts:
        s = summarize(z + b * log_prior, y)
        print(f"| {b:+g} | {100 * s['balanced_accuracy']:.1f}% | {100 * s['accuracy']:.1f}% | "
              f"{100 * s['per_class']['mel']:.1f}% |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
