import math

import torch
import torch.nn.functional as F

from dermtrain.losses import FocalLoss


def test_gamma_zero_is_cross_entropy():
    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(16, 7, generator=g), torch.randint(0, 7, (16,), generator=g)
    assert torch.allclose(FocalLoss(gamma=0.0)(logits, y), F.cross_entropy(logits, y), atol=1e-6)


def test_gamma_two_matches_hand_computation():
    logits = torch.tensor([[2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0]])
    y = torch.tensor([0, 5])
    expected = 0.0
    for row, t in zip(logits.tolist(), y.tolist()):
        p = math.exp(row[t]) / sum(math.exp(v) for v in row)
        expected += -((1 - p) ** 2) * math.log(p)
    expected /= 2
    assert abs(FocalLoss(gamma=2.0)(logits, y).item() - expected) < 1e-6


def test_per_class_alpha_weights_the_target_class():
    logits, y = torch.zeros(1, 7), torch.tensor([4])
    alpha = [1, 1, 1, 1, 3, 1, 1]
    assert abs(FocalLoss(2.0, alpha)(logits, y).item() - 3 * FocalLoss(2.0)(logits, y).item()) < 1e-6
