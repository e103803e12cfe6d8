"""Decoded, resized images held in memory as one uint8 array, so training never waits on JPEG decoding."""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from tqdm import tqdm

from dermtrain.data import Record
from engines.imageio import load_rgb
from engines.labels import CLASS_CODES
from engines.preprocess import PreprocessSpec, resize_for_model


def labels_of(records: list[Record]) -> np.ndarray:
    return np.array([CLASS_CODES.index(r.dx) for r in records], dtype=np.int64)


def build_cache(records: list[Record], spec: PreprocessSpec, desc: str = "caching",
                progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(N x size x size x 3 uint8 images, N int64 labels). Decoding runs in threads: PIL and OpenCV
    release the GIL while they work."""
    images = np.empty((len(records), spec.size, spec.size, 3), dtype=np.uint8)
    labels = labels_of(records)

    def fill(i: int) -> None:
        images[i] = resize_for_model(load_rgb(records[i].path), spec)

    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        for _ in tqdm(pool.map(fill, range(len(records))), total=len(records), desc=desc, unit="img",
                      disable=not progress, leave=False):
            pass
    return images, labels
