"""Training augmentation on whole batches of cached uint8 images: flips, rotation, colour jitter.

Working on batches in the training process (one affine resample and a few tensor ops per batch) keeps
the loader off the critical path on a 2-core machine: no decode, no per-image Python, no worker processes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentConfig:
    hflip: bool = True
    vflip: bool = True
    rotate_deg: float = 20.0
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2
    hue: float = 0.1


def to_float_nchw(batch_u8: torch.Tensor) -> torch.Tensor:
    """uint8 N x H x W x 3 -> float32 N x 3 x H x W in [0, 1]."""
    return batch_u8.permute(0, 3, 1, 2).float().div_(255.0)


def _gray(x: torch.Tensor) -> torch.Tensor:
    return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def _factor(n: int, amount: float, g: torch.Generator) -> torch.Tensor:
    return (1.0 + (torch.rand(n, generator=g) * 2 - 1) * amount).view(n, 1, 1, 1)


def _hue_shift(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate chroma in YIQ space by shift (fraction of the colour circle), per image."""
    to_yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    to_rgb = torch.linalg.inv(to_yiq)
    theta = shift * 2 * math.pi
    c, s = torch.cos(theta), torch.sin(theta)
    rot = torch.zeros(len(shift), 3, 3)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = c, -s, s, c
    m = to_rgb @ rot @ to_yiq  # N x 3 x 3
    return torch.einsum("nij,njhw->nihw", m.to(x.dtype), x)


def augment(x: torch.Tensor, cfg: AugmentConfig, g: torch.Generator) -> torch.Tensor:
    """float N x 3 x H x W in [0, 1] -> augmented, same shape, still in [0, 1]."""
    n = x.shape[0]
    angle = (torch.rand(n, generator=g) * 2 - 1) * math.radians(cfg.rotate_deg)
    sx = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0) if cfg.hflip else torch.ones(n)
    sy = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0) if cfg.vflip else torch.ones(n)
    if cfg.rotate_deg or cfg.hflip or cfg.vflip:
        cos, sin = torch.cos(angle), torch.sin(angle)
        theta = torch.stack([torch.stack([cos * sx, -sin * sy, torch.zeros(n)], 1),
                             torch.stack([sin * sx, cos * sy, torch.zeros(n)], 1)], 1)
        grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
        # Reflection keeps the skin texture at the corners instead of black wedges the model could learn.
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    if cfg.brightness:
        x = x * _factor(n, cfg.brightness, g)
    if cfg.contrast:
        mean = _gray(x).mean(dim=(2, 3), keepdim=True)
        x = (x - mean) * _factor(n, cfg.contrast, g) + mean
    if cfg.saturation:
        gray = _gray(x)
        x = (x - gray) * _factor(n, cfg.saturation, g) + gray
    if cfg.hue:
        x = _hue_shift(x, (torch.rand(n, generator=g) * 2 - 1) * cfg.hue)
    return x.clamp_(0.0, 1.0)


def normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    m = torch.tensor(mean, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - m) / s
