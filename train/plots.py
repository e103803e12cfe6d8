"""Pictures people read faster than tables: the confusion matrix and the training curves."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from engines.fsutil import atomic_path  # noqa: E402
from engines.labels import CLASS_CODES  # noqa: E402


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)


def confusion_matrix_png(cm: np.ndarray, path: Path, title: str) -> None:
    cm = np.asarray(cm)
    rows = cm.sum(axis=1, keepdims=True)
    share = np.divide(cm, rows, out=np.zeros(cm.shape), where=rows > 0)
    fig, ax = plt.subplots(figsize=(6.4, 5.6))
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(cm)):
        for j in range(len(cm)):
            ax.text(j, i, f"{cm[i, j]}\n{share[i, j]:.0%}", ha="center", va="center", fontsize=7,
                    color="white" if share[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(CLASS_CODES)), CLASS_CODES)
    ax.set_yticks(range(len(CLASS_CODES)), CLASS_CODES)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046, label="share of the true class")
    _save(fig, path)


def training_curves_png(history: list[dict], phase_boundary: int, path: Path) -> None:
    ep = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    panels = [("loss", ("train_loss", "val_loss")), ("accuracy", ("train_acc", "val_acc")),
              ("balanced accuracy / melanoma recall", ("val_balanced_acc", "val_mel_recall"))]
    for ax, (title, keys) in zip(axes, panels):
        for k in keys:
            ax.plot(ep, [h.get(k, np.nan) for h in history], marker="o", ms=3, label=k)
        if 0 < phase_boundary < (ep[-1] if ep else 0) + 1:
            ax.axvline(phase_boundary + 0.5, color="grey", ls="--", lw=1, label="phase 2 starts")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    _save(fig, path)
