"""A timm backbone cut in two at a stage boundary: the frozen early part and the trainable late part.

The feature bank runs `early` once per augmented view; training then runs only `late` (the remaining stages and
the head). `early` and `late` together are exactly the model's forward, so the checkpoint stays a whole model.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

# (stem modules, stage container, modules between the last stage and the head) per timm family
_FAMILIES = (
    (("conv_stem", "bn1"), "blocks", ("conv_head", "bn2")),  # EfficientNet / EfficientNet-Lite
    (("stem",), "stages", ("norm_pre",)),  # ConvNeXt
)


class CutError(Exception):
    """A model that cannot be cut where asked; str() is one line."""


def _family(model: nn.Module) -> tuple[tuple[str, ...], str, tuple[str, ...]]:
    for stem, stages, post in _FAMILIES:
        if all(hasattr(model, a) for a in stem) and isinstance(getattr(model, stages, None), nn.Sequential):
            return stem, stages, post
    raise CutError(f"{type(model).__name__}: no known stem/stages layout to cut (EfficientNet or ConvNeXt)")


@dataclass
class Cut:
    model: nn.Module
    at: int  # number of stages in the early part

    def __post_init__(self) -> None:
        self._stem, stages, self._post = _family(self.model)
        self._stages: nn.Sequential = getattr(self.model, stages)
        if not 0 < self.at < len(self._stages):
            raise CutError(f"cannot cut {type(self.model).__name__} after stage {self.at}: "
                           f"it has {len(self._stages)} stages")

    def early_modules(self) -> list[nn.Module]:
        return [getattr(self.model, a) for a in self._stem] + list(self._stages[: self.at])

    def late_modules(self) -> list[nn.Module]:
        rest = [getattr(self.model, a) for a in self._post if isinstance(getattr(self.model, a, None), nn.Module)]
        return list(self._stages[self.at:]) + rest + [self._head()]

    def _head(self) -> nn.Module:
        head = getattr(self.model, "head", None)
        return head if isinstance(head, nn.Module) else self.model.get_classifier()

    def early(self, x: torch.Tensor) -> torch.Tensor:
        for m in self.early_modules():
            x = m(x)
        return x

    def late(self, f: torch.Tensor) -> torch.Tensor:
        f = self._stages[self.at:](f)
        for a in self._post:
            m = getattr(self.model, a, None)
            if isinstance(m, nn.Module):
                f = m(f)
        return self.model.forward_head(f)

    def late_parameters(self) -> list[nn.Parameter]:
        return [p for m in self.late_modules() for p in m.parameters()]

    def freeze_early(self) -> None:
        for m in self.early_modules():
            m.eval()
            for p in m.parameters():
                p.requires_grad_(False)
