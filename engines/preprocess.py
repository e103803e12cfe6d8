"""The one preprocessing of DermEdge, shared by training (evaluation transform) and every inference backend.

An RGB uint8 image becomes a float32 CHW array: resized to the model's square input by the bundle's
resize policy, scaled to [0, 1], normalised by mean/std. Training caches the resized uint8 images
(`resize_for_model`) and normalises with `normalize`, so both sides run the very same code.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import cv2
import numpy as np

RESIZE_POLICIES = ("squash", "center_crop")


@dataclass(frozen=True)
class PreprocessSpec:
    size: int = 224
    resize: str = "squash"  # squash: whole image to size x size; center_crop: centred square, then resize
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    def __post_init__(self) -> None:
        if self.resize not in RESIZE_POLICIES:
            raise ValueError(f"unknown resize policy {self.resize!r}; expected one of {RESIZE_POLICIES}")
        if self.size < 8:
            raise ValueError(f"input size {self.size} is too small")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PreprocessSpec":
        return cls(size=int(d["size"]), resize=str(d["resize"]),
                   mean=tuple(float(x) for x in d["mean"]), std=tuple(float(x) for x in d["std"]))


def center_square(rgb: np.ndarray) -> np.ndarray:
    h, w = rgb.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    return rgb[top:top + s, left:left + s]


def resize_for_model(rgb: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """RGB uint8 HxWx3 -> RGB uint8 size x size x 3."""
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an RGB uint8 HxWx3 image, got dtype {rgb.dtype} shape {rgb.shape}")
    if spec.resize == "center_crop":
        rgb = center_square(rgb)
    h, w = rgb.shape[:2]
    if (h, w) == (spec.size, spec.size):
        return np.ascontiguousarray(rgb)
    # INTER_AREA averages when shrinking (no aliasing); INTER_LINEAR when enlarging.
    interp = cv2.INTER_AREA if h * w > spec.size * spec.size else cv2.INTER_LINEAR
    return cv2.resize(rgb, (spec.size, spec.size), interpolation=interp)


def normalize(resized: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """uint8 (N,) H x W x 3 -> float32 (N,) 3 x H x W: (x / 255 - mean) / std, computed as one multiply-add per
    channel plane (OpenCV, 3x faster than the numpy expression on the scan's hot path)."""
    std = np.asarray(spec.std, dtype=np.float64)
    scale = 1.0 / (255.0 * std)
    bias = -np.asarray(spec.mean, dtype=np.float64) / std
    single = resized.ndim == 3
    batch = resized[None] if single else resized
    n, h, w, _ = batch.shape
    out = np.empty((n, 3, h, w), dtype=np.float32)
    for i in range(n):
        for c in range(3):
            cv2.multiply(np.ascontiguousarray(batch[i, :, :, c]), float(scale[c]), dst=out[i, c], dtype=cv2.CV_32F)
            out[i, c] += np.float32(bias[c])
    return out[0] if single else out


def flip_views(x: np.ndarray, h_axis: int = -2, w_axis: int = -1) -> list[np.ndarray]:
    """The test-time views, the same in evaluation and in dermscan: identity, horizontal, vertical, both flips."""
    return [x, np.flip(x, w_axis), np.flip(x, h_axis), np.flip(x, (h_axis, w_axis))]


def preprocess(rgb: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """One RGB uint8 image -> float32 3 x size x size, ready for the model."""
    return normalize(resize_for_model(rgb, spec), spec)


def preprocess_batch(images: list[np.ndarray], spec: PreprocessSpec) -> np.ndarray:
    """RGB uint8 images of any sizes -> float32 N x 3 x size x size."""
    if not images:
        return np.zeros((0, 3, spec.size, spec.size), np.float32)
    return normalize(np.stack([resize_for_model(im, spec) for im in images]), spec)
