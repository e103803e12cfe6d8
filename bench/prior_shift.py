"""What the prior shift trades, on validation: the logits of a model with a further share of the training log-prior
added (or, negative, taken back), for the top-1 label (balanced accuracy, accuracy) and for the melanoma flag (how
well p(melanoma) ranks melanomas: ROC AUC, and specificity and share of images flagged at the threshold that keeps
>= 90% of validation melanomas). The test split is not read.

    python bench/prior_shift.py runs/lite0-f3-kd [--shifts -0.25 -0.125 0 0.125 0.25]
    python bench/prior_shift.py engines/models/efficientnet_lite0.onnx --data $DERM_DATA

A run folder gives its validation logits (`dermtrain eval RUN` saves them) and the log-prior its loss saw; an ONNX
bundle is run on the validation images of --split, with the log-prior of that split's training images.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

from dermtrain.metrics import auc_binary, binary_rates, softmax, summarize, threshold_for_sensitivity
from engines.labels import MEL_INDEX


class ShiftError(Exception):
    """Inputs that cannot be scored; str() is one line."""


def from_run(run: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    from dermtrain.torchfile import CheckpointError, read_run_checkpoint
    logits_file, best = run / "logits_test.npz", run / "best.pt"
    for f, hint in ((logits_file, f"run `dermtrain eval {run}` first"), (best, "has the run finished an epoch?")):
        if not f.is_file():
            raise ShiftError(f"{f}: not found ({hint})")
    d = np.load(logits_file)
    try:
        state = read_run_checkpoint(best)
    except CheckpointError as e:
        raise ShiftError(str(e)) from None
    if "log_prior" not in state:
        raise ShiftError(f"{best}: not a recipe run (no log_prior in the checkpoint)")
    return (d["val_logits"], d["val_labels"], np.asarray(state["log_prior"], np.float32),
            f"prior shift {state['prior_shift']:g} folded into best.pt")


def from_bundle(onnx_path: Path, data: Path, split: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    from dermconvert.pipeline import validation_batch
    from dermtrain.fit import split_log_prior
    from engines.onnx_backend import OrtEngine
    eng = OrtEngine(onnx_path, "cpu")
    x, y = validation_batch(data, split, eng.bundle.preprocess, progress=False)
    return (eng.logits(x)[0], y, split_log_prior(data, split),
            f"{eng.describe()}; log-prior of the training images of {split.name}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", type=Path, help="a run folder, or an ONNX bundle (with --data)")
    ap.add_argument("--shifts", type=float, nargs="+", default=[-0.5, -0.25, -0.125, 0.0, 0.125, 0.25, 0.5, 1.0])
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("DERM_DATA", "../shared/data/ham10000")))
    ap.add_argument("--split", type=Path, default=Path("splits/ham10000_seed0.csv"))
    a = ap.parse_args(argv)
    try:
        if a.model.suffix == ".onnx":
            z, y, log_prior, what = from_bundle(a.model, a.data, a.split)
        else:
            z, y, log_prior, what = from_run(a.model)
    except Exception as e:  # noqa: BLE001 - one line, whatever failed to load
        print(f"prior_shift: {e}", file=sys.stderr)
        return 2
    mel = y == MEL_INDEX
    print(f"{a.model}: {what}; validation, n={len(y)} ({int(mel.sum())} melanomas)")
    print("| further shift | balanced accuracy | accuracy | melanoma recall (argmax) | melanoma AUC | "
          "specificity at >= 90% melanoma recall | validation flagged |")
    print("|---|---|---|---|---|---|---|")
    for b in a.shifts:
        shifted = z + b * log_prior
        s = summarize(shifted, y)
        p_mel = softmax(shifted)[:, MEL_INDEX]
        flag = binary_rates(p_mel, mel, threshold_for_sensitivity(p_mel, mel, 0.90))
        print(f"| {b:+g} | {100 * s['balanced_accuracy']:.1f}% | {100 * s['accuracy']:.1f}% | "
              f"{100 * s['per_class']['mel']:.1f}% | {auc_binary(p_mel, mel):.3f} | "
              f"{100 * flag['specificity']:.1f}% | {100 * (flag['tp'] + flag['fp']) / len(y):.1f}% |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
