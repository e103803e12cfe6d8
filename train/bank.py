"""The feature bank: K augmented views of every training image run once through the frozen early stages.

The early, high-resolution stages cost most of a fine-tuning step. Run once per view, their outputs (float16, in
memory) let the late stages and the head train for many epochs at a fraction of the cost. The bank is cached on
disk under a key of everything it depends on, so a resumed run or a second recipe on the same bank skips the build.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from dermtrain.augment import AugmentConfig, AugmentParams, apply_params, draw_params, to_float_nchw
from dermtrain.config import TrainConfig
from dermtrain.precision import bf16_is_fast
from dermtrain.augment import normalize as torch_normalize
from dermtrain.stages import Cut
from engines.fsutil import atomic_path
from engines.preprocess import PreprocessSpec

BANK_VERSION = 1  # bump when what a bank holds changes: every cached bank is then rebuilt

# The uint8 training images, decoded only when a bank has to be built: a cached bank needs none of their pixels.
Images = Callable[[], np.ndarray]
# (image indices, view indices) -> those rows of a bank as a float16 tensor on the training device.
Rows = Callable[[np.ndarray, np.ndarray], torch.Tensor]


def view_params(n: int, views: int, cfg: AugmentConfig, seed: int) -> AugmentParams:
    """The K views of N images: view 0 is the image itself, views 1..K-1 are random augmentations.

    A function of (n, views, cfg, seed) alone, so teachers and students trained apart see the very same views.
    """
    draws = [draw_params(n, cfg, torch.Generator().manual_seed(seed * 1_009 + v)) for v in range(views)]
    stacked = AugmentParams(*(torch.stack([getattr(d, f) for d in draws]) for f in AugmentParams.__dataclass_fields__))
    for f, neutral in (("angle", 0.0), ("sx", 1.0), ("sy", 1.0), ("brightness", 1.0), ("contrast", 1.0),
                       ("saturation", 1.0), ("hue", 0.0), ("sharpness", 1.0), ("jpeg", 100.0)):
        getattr(stacked, f)[0] = neutral
    return stacked


def make_views(images_u8: np.ndarray, params: AugmentParams, spec: PreprocessSpec,
               device: torch.device | None = None) -> torch.Tensor:
    """Normalised float32 N x 3 x H x W views of cached uint8 images, one parameter set per image, rendered on
    `device` (default the CPU): the uint8 images travel, a quarter of the float bytes, and a GPU is not left
    waiting for the CPU to rotate and colour every batch."""
    u8 = torch.from_numpy(np.ascontiguousarray(images_u8))
    x = apply_params(to_float_nchw(u8 if device is None else u8.to(device)), params)
    return torch_normalize(x, spec.mean, spec.std)


def bank_key(model: str, init: str | None, cut_at: int, views: int, spec: PreprocessSpec, split_sha256: str,
             augment: AugmentConfig, seed: int, n: int, bf16: bool) -> str:
    what = {"model": model, "init": init, "cut_at": cut_at, "views": views, "preprocess": spec.to_dict(),
            "split": split_sha256, "augment": augment.key_dict(), "seed": seed, "n": n, "bf16": bf16,
            "version": BANK_VERSION}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def default_cache_dir() -> Path:
    return Path(os.environ.get("DERM_CACHE", Path.home() / ".cache" / "dermedge")) / "banks"


@torch.no_grad()
def early_features(cut: Cut, images_u8: np.ndarray, params: AugmentParams | None, spec: PreprocessSpec,
                   batch: int = 64, desc: str = "", progress: bool = True, bf16: bool = False) -> np.ndarray:
    """float16 early-stage outputs of N images (one view each; params None: the image itself). float32 unless
    bf16: validation features always run in float32, as the whole network does at inference. The early stages
    are frozen first, whatever mode the model is in: in training mode BatchNorm would use each batch's statistics
    and overwrite the pretrained running ones."""
    cut.freeze_early()
    out = None
    device = next(cut.model.parameters()).device
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    for i in tqdm(range(0, len(images_u8), batch), desc=desc, unit="batch", disable=not progress, leave=False):
        sl = slice(i, i + batch)
        if params is None:
            x = torch_normalize(to_float_nchw(torch.from_numpy(images_u8[sl]).to(device)), spec.mean, spec.std)
        else:
            x = make_views(images_u8[sl], params.take(sl), spec, device)
        with amp:
            f = cut.early(x.contiguous(memory_format=torch.channels_last)).float().cpu().numpy()
        if out is None:
            out = np.empty((len(images_u8), *f.shape[1:]), np.float16)
        out[sl] = f
    return out


def bank_for(cfg: TrainConfig, cut: Cut, images: Images, params: AugmentParams, spec: PreprocessSpec,
             split_sha256: str, cache_dir: Path | None = None, progress: bool = True) -> np.ndarray:
    """The bank a recipe config describes (its cut, views and precision), from the disk cache or built: the one
    place a teacher's training and a student's distillation agree on what its key is."""
    r = cfg.recipe
    n = params.angle.shape[1]
    bf16 = r.bank_bf16 and bf16_is_fast(next(cut.model.parameters()).device)  # the key says what was computed
    key = bank_key(cfg.model, cfg.init, r.freeze_at, r.views, spec, split_sha256, cfg.augment, cfg.seed, n, bf16)
    return build_bank(cut, images, params, spec, key, cache_dir or default_cache_dir(), progress, bf16)


def build_bank(cut: Cut, images: Images, params: AugmentParams, spec: PreprocessSpec, key: str,
               cache_dir: Path | None, progress: bool = True, bf16: bool = True) -> np.ndarray:
    """K x N x C x h x w float16, from the disk cache when one with this key exists. bf16 autocast makes the
    build 2.6x faster on an AVX-512 CPU (Lite0 @192: 180 vs 68 images/s; `dermtrain.precision`); the features are
    stored as float16."""
    path = (cache_dir / f"bank-{key}.npy") if cache_dir else None
    if path is not None and path.is_file():
        bank = np.load(path)
        if bank.shape[:2] == tuple(params.angle.shape):
            return bank
    images_u8 = images()
    k = params.angle.shape[0]
    bank = None
    for v in range(k):
        f = early_features(cut, images_u8, params.take(v), spec, desc=f"feature bank view {v + 1}/{k}",
                           progress=progress, bf16=bf16)
        if bank is None:
            bank = np.empty((k, *f.shape), np.float16)
        bank[v] = f
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as fh:
                np.save(fh, bank)
    return bank


def bank_rows(bank: np.ndarray, device: torch.device) -> Rows:
    """A step's rows of `bank` on `device`. On a GPU with room for it (a quarter of its free memory) the whole bank
    moves there once and each step gathers in device memory; otherwise, and on the CPU, each step copies its rows
    from host memory. The H200 runs gathered on the host and kept the GPU 15-60% busy
    (docs/models/experiments/gpu_h200/)."""
    if _fits(bank.nbytes, device):
        resident = torch.from_numpy(np.ascontiguousarray(bank)).to(device)
        return lambda idx, v: resident[torch.as_tensor(v, device=device), torch.as_tensor(idx, device=device)]
    return lambda idx, v: torch.from_numpy(bank[v, idx]).to(device)


def _fits(nbytes: int, device: torch.device) -> bool:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return nbytes < free // 4
    return device.type == "meta"  # holds no data: lets a test see the resident path run without a GPU
