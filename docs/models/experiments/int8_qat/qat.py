"""Quantization-aware fine-tuning of a run's weights for `dermconvert --int8` (an experiment, not project code).

Every convolution's weight is seen through the quantizer ONNX Runtime will apply to it: folded with the BatchNorm
after it (frozen, eval mode), per output channel, symmetric, 7 bits (scale = max|w| / 63, the `--int8` form), with
a straight-through gradient; the classifier alike. The network learns, from the FP32 model's own logits (mean
squared error) on the training images (random flips), weights that survive that rounding; they are then written
back on the grid exactly, so ONNX Runtime's quantizer reproduces them and only the activations are left to
calibration. With --activations the activations are rounded too, where ONNX Runtime's QDQ graph rounds them (the
input, every BatchNorm's output after its ReLU6, every block's output after its residual add, the pooled features):
uint8, asymmetric, ranges from the min / max over 512 training images as its MinMax calibration takes them, frozen.
With --ort-scales the activations are rounded where ONNX Runtime's own QDQ graph of the run's FP32 bundle rounds them,
with its scales and zero points (`dermconvert.int8._quantize`, the `--int8` form, 512 calibration images).
Written as a run folder copy (best.pt replaced), for `dermconvert RUN --onnx M.onnx --int8`.

    python docs/models/experiments/int8_qat/qat.py runs/lite0-camera-kd-s2 runs/lite0-camera-kd-s2-qat \
        --data $DERM_DATA --epochs 2
"""
from __future__ import annotations

import argparse
import copy
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from dermtrain.cache import build_cache
from dermtrain.data import load_records
from dermtrain.evaluate import load_run_model
from dermtrain.fit import save_checkpoint
from dermtrain.splits import read_manifest, select
from engines.preprocess import normalize

QMAX = 63.0  # 7-bit symmetric weights, as convert/int8.py asks ONNX Runtime for (reduce_range)


def fake_quant(w: torch.Tensor) -> torch.Tensor:
    """Per output channel symmetric rounding to QMAX levels, straight-through gradient."""
    dims = tuple(range(1, w.dim()))
    scale = w.detach().abs().amax(dim=dims, keepdim=True).clamp_min(1e-12) / QMAX
    q = torch.clamp(torch.round(w / scale), -QMAX - 1, QMAX) * scale
    return w + (q - w).detach()


class FoldedQuant(nn.Module):
    """weight -> fake_quant(weight x s) / s, s the per-channel factor the following BatchNorm folds in."""

    def __init__(self, fold: torch.Tensor):
        super().__init__()
        self.register_buffer("fold", fold)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        s = self.fold.view(-1, *([1] * (w.dim() - 1)))
        return fake_quant(w * s) / s


class FixedQuant:
    """x rounded to uint8 with a given scale and zero point (straight-through)."""

    def __init__(self, scale: float, zp: int):
        self.scale, self.zp = scale, zp

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        q = (torch.clamp(torch.round(x / self.scale) + self.zp, 0, 255) - self.zp) * self.scale
        return x + (q - x).detach()


def ort_points(onnx_path: Path, calib: np.ndarray, size: int) -> dict[str, tuple[float, int]]:
    """Activation tensor name -> (scale, zero point) of ONNX Runtime's QDQ graph of the bundle."""
    from onnx import numpy_helper

    from dermconvert.int8 import _quantize
    _, qmodel = _quantize(onnx_path, calib, size, signed=False)
    inits = {i.name: numpy_helper.to_array(i) for i in qmodel.graph.initializer}
    points = {}
    for n in qmodel.graph.node:
        if n.op_type == "QuantizeLinear" and n.input[0] not in inits:
            points[n.input[0]] = (float(inits[n.input[1]]), int(inits[n.input[2]]))
    return points


def hook_ort_points(model: nn.Module, points: dict[str, tuple[float, int]],
                    pairs: list[tuple[nn.Module, nn.Module | None]]) -> int:
    """Each ONNX tensor's rounding at the torch module that computes it: `/a/a.1/a.1.0/bn1/act/Clip_output_0` is
    module `a.1.0.bn1.act`'s output; a folded convolution's output is its BatchNorm's; a Pad's output is the padded
    convolution's input; the graph input is the stem's input."""
    mods = dict(model.named_modules())
    bn_after = {id(c): b for c, b in pairs}
    hooked = 0
    for tensor, (scale, zp) in points.items():
        q = FixedQuant(scale, zp)
        if tensor == "input":
            mods["conv_stem"].register_forward_pre_hook(lambda _m, args, q=q: (q(args[0]),))
            hooked += 1
            continue
        if tensor.startswith("logits"):  # the bundle's logits output, rounded too
            mods["classifier"].register_forward_hook(lambda _m, _i, out, q=q: q(out))
            hooked += 1
            continue
        comps = tensor.removesuffix("_output_0").split("/")[1:]
        if len(comps) < 2:
            print(f"not placed: {tensor}")
            continue
        op, path = comps[-1], comps[:-1]
        dotted = [c for c in path if "." in c]
        name = ".".join(([dotted[-1]] + path[path.index(dotted[-1]) + 1:]) if dotted else path)
        m = mods.get(name)
        if m is None:
            print(f"not placed: {tensor}")
            continue
        if op == "Pad":
            m.register_forward_pre_hook(lambda _m, args, q=q: (q(args[0]),))
        else:
            if op == "Conv" and bn_after.get(id(m)) is not None:
                m = bn_after[id(m)]
            m.register_forward_hook(lambda _m, _i, out, q=q: q(out))
        hooked += 1
    return hooked


class ActQuant:
    """Forward hooks that observe a module's output (or the stem's input) until `freeze`, then round it to uint8 over
    the observed range."""

    def __init__(self):
        self.lo, self.hi = float("inf"), float("-inf")
        self.fixed: FixedQuant | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.fixed is not None:
            return self.fixed(x)
        self.lo, self.hi = min(self.lo, x.min().item()), max(self.hi, x.max().item())
        return x

    def freeze(self) -> None:
        lo, hi = min(self.lo, 0.0), max(self.hi, 0.0)  # the range holds zero, as ONNX Runtime makes it
        scale = max(hi - lo, 1e-8) / 255.0
        self.fixed = FixedQuant(scale, round(-lo / scale))


def quantize_activations(model: nn.Module) -> list[ActQuant]:
    """Hooks at the points ONNX Runtime's QDQ graph rounds activations."""
    quants = []

    def out_hook(q):
        return lambda _m, _i, out: q(out)

    stem_in = ActQuant()
    model.conv_stem.register_forward_pre_hook(lambda _m, args: (stem_in(args[0]),))
    quants.append(stem_in)
    targets = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    targets += [blk for stage in model.blocks for blk in stage]
    targets.append(model.global_pool)
    for m in targets:
        q = ActQuant()
        m.register_forward_hook(out_hook(q))
        quants.append(q)
    return quants


def conv_bn_pairs(model: nn.Module) -> list[tuple[nn.Module, nn.Module | None]]:
    """Each convolution with the BatchNorm that follows it in module order (None for the classifier)."""
    mods = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d))]
    pairs = []
    for i, m in enumerate(mods):
        if isinstance(m, nn.Conv2d):
            bn = mods[i + 1] if i + 1 < len(mods) and isinstance(mods[i + 1], nn.BatchNorm2d) else None
            pairs.append((m, bn))
        elif isinstance(m, nn.Linear):
            pairs.append((m, None))
    return pairs


def fold_factor(conv: nn.Module, bn: nn.Module | None) -> torch.Tensor:
    if bn is None:
        return torch.ones(conv.weight.shape[0])
    return (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach().clone()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("run", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--activations", action="store_true", help="round the activations too (calibrated, frozen ranges)")
    p.add_argument("--ort-scales", type=Path, help="the run's FP32 ONNX bundle: round the activations where and as "
                   "ONNX Runtime's QDQ graph of it does")
    a = p.parse_args()
    torch.manual_seed(a.seed)
    rng = np.random.default_rng(a.seed)

    model, cfg, spec, state = load_run_model(a.run)
    teacher = copy.deepcopy(model).eval()
    pairs = conv_bn_pairs(model)
    for conv, bn in pairs:
        parametrize.register_parametrization(conv, "weight", FoldedQuant(fold_factor(conv, bn)))
    for prm in model.parameters():
        prm.requires_grad_(False)
    trainable = []
    for conv, _ in pairs:
        orig = conv.parametrizations.weight.original
        orig.requires_grad_(True)
        trainable.append(orig)
    print(f"{len(pairs)} weights fake-quantized (7-bit, folded with their BatchNorm)")

    rows = read_manifest(a.run / "split.csv")
    recs = select(rows, load_records(a.data), "train")
    images, _ = build_cache(recs, spec, "caching train")
    if a.activations:
        quants = quantize_activations(model)
        calib = images[np.sort(rng.choice(len(images), 512, replace=False))]
        with torch.no_grad():
            for i in range(0, len(calib), 64):
                model(torch.from_numpy(normalize(calib[i:i + 64], spec)).contiguous(memory_format=torch.channels_last))
        for q in quants:
            q.freeze()
        print(f"{len(quants)} activations rounded to uint8 over ranges from 512 training images")
    if a.ort_scales:
        pick = np.sort(np.random.default_rng(0).choice(len(images), 512, replace=False))
        points = ort_points(a.ort_scales, normalize(images[pick], spec), spec.size)
        print(f"{hook_ort_points(model, points, pairs)} of {len(points)} of ONNX Runtime's activation roundings placed")
    opt = torch.optim.AdamW(trainable, lr=a.lr, weight_decay=0.0)
    steps = a.epochs * (len(images) // a.batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    model.eval()  # BatchNorm statistics frozen: the fold the quantizer sees must be the exported one
    t0, step = time.time(), 0
    for epoch in range(a.epochs):
        order = rng.permutation(len(images))
        run_loss = 0.0
        for b in range(len(images) // a.batch):
            idx = np.sort(order[b * a.batch:(b + 1) * a.batch])
            x = images[idx]
            if rng.random() < 0.5:
                x = x[:, :, ::-1]
            if rng.random() < 0.5:
                x = x[:, ::-1]
            xt = torch.from_numpy(normalize(np.ascontiguousarray(x), spec)).contiguous(memory_format=torch.channels_last)
            with torch.no_grad():
                target = teacher(xt)
            loss = nn.functional.mse_loss(model(xt), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            run_loss += loss.item()
            if step % 20 == 0:
                print(f"epoch {epoch + 1} step {step}/{steps}: loss {run_loss / (b + 1):.4f} "
                      f"({step * a.batch / (time.time() - t0):.1f} img/s)", flush=True)

    for conv, _ in pairs:  # the weights written back on the grid: exactly what the quantizer will find
        parametrize.remove_parametrizations(conv, "weight", leave_parametrized=True)
    a.out.mkdir(parents=True, exist_ok=True)
    for f in a.run.iterdir():
        if f.is_file() and f.suffix != ".pt":
            shutil.copy(f, a.out / f.name)
    save_checkpoint(a.out / "best.pt", {**state, "model": model.state_dict()})  # hooks hold no weights
    print(f"wrote {a.out / 'best.pt'} after {steps} steps in {(time.time() - t0) / 60:.1f} min")


if __name__ == "__main__":
    main()
