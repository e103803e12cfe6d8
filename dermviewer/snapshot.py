"""Snapshots: the frame as PNG plus a JSON of what the model said about it, each file complete or absent."""
from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import cv2
import numpy as np

from dermviewer.inference import Result
from engines.fsutil import atomic_path, write_json
from engines.labels import class_name


def save_snapshot(folder: Path, rgb: np.ndarray, result: Result | None, classes: tuple[str, ...], model: str,
                  backend: str, source: str, threshold: float) -> tuple[Path, Path]:
    now = datetime.now(timezone.utc)
    stem = folder / f"snapshot-{now.strftime('%Y%m%d-%H%M%S-%f')}"
    png, meta = stem.with_suffix(".png"), stem.with_suffix(".json")
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise OSError(f"{png}: PNG encoding failed")
    with atomic_path(png) as tmp:
        tmp.write_bytes(buf.tobytes())
    info = {"timestamp": now.isoformat(), "source": source, "model": model, "backend": backend,
            "image": png.name, "width": int(rgb.shape[1]), "height": int(rgb.shape[0]),
            "notice": "Decision support, not a diagnosis."}
    if result is not None:
        info.update({"label": result.label, "label_name": class_name(result.label), "confidence": result.confidence,
                     "probabilities": {c: float(p) for c, p in zip(classes, result.probs)},
                     "probabilities_this_frame": {c: float(p) for c, p in zip(classes, result.raw_probs)},
                     "melanoma_score": result.mel_score, "melanoma_flag": result.melanoma_flag,
                     "melanoma_threshold": threshold,
                     "region": dict(zip(("top", "left", "height", "width"), result.box)),
                     "frame_index": result.frame_index})
    write_json(meta, info)
    return png, meta

