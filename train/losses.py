"""Focal loss (Lin et al. 2017): cross-entropy that down-weights the easy, mostly benign, examples."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class FocalLoss(nn.Module):
    """mean over the batch of -alpha_t * (1 - p_t)^gamma * log p_t.

    alpha is one number (1 = plain focal loss) or one weight per class.
    """

    def __init__(self, gamma: float = 2.0, alpha: float | Sequence[float] = 1.0):
        super().__init__()
        self.gamma = float(gamma)
        a = torch.as_tensor(alpha, dtype=torch.float32)
        self.register_buffer("alpha", a if a.ndim else a.reshape(()), persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logp = F.log_softmax(logits.float(), dim=1)
        logp_t = logp.gather(1, target[:, None]).squeeze(1)
        p_t = logp_t.exp()
        alpha_t = self.alpha[target] if self.alpha.ndim else self.alpha
        loss = -alpha_t * (1.0 - p_t).pow(self.gamma) * logp_t
        return loss.mean()
