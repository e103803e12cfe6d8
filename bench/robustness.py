"""How much a model's answers move when the same validation images reach it the way another clinic's would: larger
(resampled), sharpened, blurred, or compressed harder. Each perturbation is applied to the stored image, which then
takes the product's own path (`Engine.predict`'s preprocessing); the test split is not read.

    python bench/robustness.py engines/models/efficientnet_lite0.onnx [other.onnx ...] --data $DERM_DATA \
        [--split splits/ham10000_seed0.csv] [--limit 500] [--out docs/robustness.md]

Prints, per model and perturbation: top-1 agreement with the stored images' answers, accuracy, balanced accuracy,
melanoma recall and specificity at the model's own flag, and the share flagged; then each model's mean balanced
accuracy and agreement over the perturbations.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

Perturbation = Callable[[np.ndarray], np.ndarray]


def _unsharp(amount: float) -> Perturbation:
    def f(rgb: np.ndarray) -> np.ndarray:
        blurred = cv2.GaussianBlur(rgb, (0, 0), 1.0)
        return cv2.addWeighted(rgb, 1 + amount, blurred, -amount, 0)
    return f


def _rescaled(factor: float, interp: int) -> Perturbation:
    def f(rgb: np.ndarray) -> np.ndarray:
        h, w = rgb.shape[:2]
        return cv2.resize(rgb, (round(w * factor), round(h * factor)), interpolation=interp)
    return f


def _blurred(factor: float) -> Perturbation:
    def f(rgb: np.ndarray) -> np.ndarray:
        h, w = rgb.shape[:2]
        small = cv2.resize(rgb, (round(w / factor), round(h / factor)), interpolation=cv2.INTER_AREA)
        return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
    return f


def _jpeg(quality: int) -> Perturbation:
    def f(rgb: np.ndarray) -> np.ndarray:
        from dermtrain.augment import jpeg_roundtrip  # the training option's own re-encoding

        return jpeg_roundtrip(rgb, quality)
    return f


PERTURBATIONS: dict[str, Perturbation] = {
    "3x larger (bicubic)": _rescaled(3.0, cv2.INTER_CUBIC),
    "sharpened (unsharp mask, sigma 1, 0.5)": _unsharp(0.5),
    "sharpened (unsharp mask, sigma 1, 1.0)": _unsharp(1.0),
    "blurred (1.5x down and up)": _blurred(1.5),
    "JPEG quality 50": _jpeg(50),
}


@dataclass(frozen=True)
class Row:
    model: str
    perturbation: str
    agreement: float
    accuracy: float
    balanced_accuracy: float
    mel_recall: float
    mel_specificity: float
    flagged: float


def score(engine, images: list[np.ndarray], batch: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(argmax labels, melanoma flags) of the engine on RGB images, through its own preprocessing."""
    preds = [p for i in range(0, len(images), batch) for p in engine.predict(images[i:i + batch])]
    classes = list(engine.bundle.classes)
    return np.array([classes.index(p.label) for p in preds]), np.array([p.melanoma_flag for p in preds])


def rows_for(model: Path, images: list[np.ndarray], labels: np.ndarray) -> list[Row]:
    from dermtrain.metrics import balanced_accuracy, confusion
    from engines.labels import MEL_INDEX
    from engines.onnx_backend import OrtEngine

    eng = OrtEngine(model, "cpu")
    answers = {"as stored": score(eng, images)}
    answers.update((name, score(eng, [f(im) for im in images])) for name, f in PERTURBATIONS.items())
    base, mel = answers["as stored"][0], labels == MEL_INDEX
    return [Row(model.name, name, float((pred == base).mean()), float((pred == labels).mean()),
                balanced_accuracy(confusion(labels, pred)), float(flag[mel].mean()), float(1 - flag[~mel].mean()),
                float(flag.mean()))
            for name, (pred, flag) in answers.items()]


def validation_images(data: Path, split: Path, limit: int | None) -> tuple[list[np.ndarray], np.ndarray]:
    from dermtrain.data import load_records
    from dermtrain.splits import read_manifest, select
    from engines.imageio import load_rgb
    from engines.labels import CLASS_CODES

    recs = select(read_manifest(split), load_records(data), "val", limit, 0)
    return [load_rgb(r.path) for r in recs], np.array([CLASS_CODES.index(r.dx) for r in recs])


def table(rows: list[Row]) -> str:
    lines = ["| model | images reach it | agreement with as stored | accuracy | balanced accuracy | melanoma recall / "
             "specificity at its flag | flagged |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.model} | {r.perturbation} | {r.agreement:.1%} | {r.accuracy:.1%} | {r.balanced_accuracy:.1%}"
                     f" | {r.mel_recall:.1%} / {r.mel_specificity:.1%} | {r.flagged:.1%} |")
    lines += ["", "| model | balanced accuracy as stored | mean over the perturbations | mean agreement |", "|---|---|---|---|"]
    for m in dict.fromkeys(r.model for r in rows):
        mine = [r for r in rows if r.model == m]
        moved = [r for r in mine if r.perturbation != "as stored"]
        lines.append(f"| {m} | {mine[0].balanced_accuracy:.1%} | {np.mean([r.balanced_accuracy for r in moved]):.1%} | "
                     f"{np.mean([r.agreement for r in moved]):.1%} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="+", type=Path, help="ONNX bundles")
    p.add_argument("--data", default=os.environ.get("DERM_DATA"), help="HAM10000 folder (default $DERM_DATA)")
    p.add_argument("--split", type=Path, default=Path("splits/ham10000_seed0.csv"))
    p.add_argument("--limit", type=int, help="a stratified subset of N validation images")
    p.add_argument("--out", type=Path, help="also write the tables to this markdown file")
    a = p.parse_args(argv)
    if not a.data:
        print("robustness: pass --data or set DERM_DATA", file=sys.stderr)
        return 2
    images, labels = validation_images(Path(a.data), a.split, a.limit)
    rows = [r for m in a.models for r in rows_for(m, images, labels)]
    text = table(rows)
    print(text)
    if a.out:
        from engines.fsutil import atomic_path
        with atomic_path(a.out) as tmp:
            tmp.write_text(f"Validation images of `{a.split}` ({len(labels)}), `python bench/robustness.py "
                           f"{' '.join(str(m) for m in a.models)}`\n\n{text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
