"""Feature hints (FitNets, Romero et al. 2015): a from-scratch student learns a pretrained teacher's mid-level features.

A ConvNeXt trained from scratch on 7,000 images must learn from the labels alone what ImageNet taught the
EfficientNet teachers' early stages, and it underfits. A bank-trained teacher's bank already holds the outputs of its
frozen ImageNet early stages on every training view, so the student can regress its own features at the same stride
onto them at no teacher cost per step: through a 1 x 1 projection that is used in training only, against the bank's
features standardised per channel and pooled to the student's grid, mirrored with the student's view.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dermtrain.augment import apply_dihedral
from dermtrain.bank import bank_rows
from dermtrain.stages import Cut


def channel_stats(features: np.ndarray, chunk: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and standard deviation of N x C x h x w float16 features (float64 sums, in chunks)."""
    total, squares = np.zeros(features.shape[1]), np.zeros(features.shape[1])
    for i in range(0, len(features), chunk):
        f = features[i:i + chunk].astype(np.float64)
        total += f.sum((0, 2, 3))
        squares += (f * f).sum((0, 2, 3))
    n = features.shape[0] * features.shape[2] * features.shape[3]
    mean = total / n
    std = np.sqrt(np.maximum(squares / n - mean * mean, 1e-12))
    return torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)


class FeatureHint(nn.Module):
    """The student's logits and its features after `at` stages; the hint loss against the teacher's bank."""

    def __init__(self, student: nn.Module, at: int, bank: np.ndarray, img_size: int):
        super().__init__()
        self.cut = Cut(student, at)
        device = next(student.parameters()).device
        was_training = student.training
        student.eval()  # the probe must not draw drop-path masks from the global generator
        with torch.no_grad():
            probe = self.cut.early(torch.zeros(1, 3, img_size, img_size, device=device))
        student.train(was_training)
        self.grid = tuple(probe.shape[2:])
        self.proj = nn.Conv2d(probe.shape[1], bank.shape[2], 1).to(device)
        mean, std = channel_stats(bank[0])
        self.register_buffer("mean", mean.view(1, -1, 1, 1).to(device))
        self.register_buffer("std", std.view(1, -1, 1, 1).to(device))
        self.rows = bank_rows(bank, device)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.cut.early(x)
        return self.cut.late(f), f

    def loss(self, features: torch.Tensor, idx: np.ndarray, views: np.ndarray, bits: torch.Tensor | None
             ) -> torch.Tensor:
        t = self.rows(idx, views).float()
        t = F.adaptive_avg_pool2d((t - self.mean) / self.std, self.grid)
        if bits is not None:
            t = apply_dihedral(t, bits)
        return F.mse_loss(self.proj(features.float()), t)
