"""`dermtrain bench`: training images/s with the real loader (cache + batch augmentation) against
synthetic in-memory tensors, for the same model, batch and resolution."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from dermtrain.augment import augment, normalize as torch_normalize, to_float_nchw
from dermtrain.cache import build_cache
from dermtrain.config import TrainConfig
from dermtrain.data import load_records
from dermtrain.fit import amp_context, epoch_order, preprocess_spec
from dermtrain.losses import FocalLoss
from dermtrain.models import create_model, set_trainable, train_mode
from dermtrain.splits import read_manifest, select


def _steps(model, opt, loss_fn, amp, batches, channels_last: bool) -> float:
    """images/s over the given iterator of (x, y) batch makers."""
    n = 0
    t0 = time.perf_counter()
    for make in batches:
        x, y = make()
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with amp:
            loss = loss_fn(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        n += len(y)
    return n / (time.perf_counter() - t0)


def bench(cfg: TrainConfig, data_dir: Path, split_path: Path, steps: int = 20, warmup: int = 3,
          trainable: str | None = None) -> dict:
    torch.set_num_threads(cfg.threads or torch.get_num_threads())
    spec = preprocess_spec(cfg)
    recs = select(read_manifest(split_path), load_records(data_dir), "train",
                  cfg.batch_size * (steps + warmup), cfg.seed)
    xs, ys = build_cache(recs, spec, "caching", True)
    model = create_model(cfg.model)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    set_trainable(model, trainable or cfg.phase1.trainable)
    train_mode(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    loss_fn, amp = FocalLoss(cfg.focal_gamma), amp_context(cfg, torch.device("cpu"))
    order = epoch_order(ys, cfg, 0)
    g = torch.Generator().manual_seed(0)
    bs = cfg.batch_size

    def real(b: int):
        idx = order[(b * bs) % len(order):][:bs].numpy()
        x = torch_normalize(augment(to_float_nchw(torch.from_numpy(xs[idx])), cfg.augment, g), spec.mean, spec.std)
        return x, torch.from_numpy(ys[idx])

    sx = torch.randn(bs, 3, spec.size, spec.size)
    sy = torch.from_numpy(np.resize(ys, bs))

    def synthetic(_b: int):
        return sx, sy

    result = {}
    for name, maker in (("synthetic", synthetic), ("real", real), ("synthetic_again", synthetic)):
        _steps(model, opt, loss_fn, amp, (lambda b=b: maker(b) for b in range(warmup)), cfg.channels_last)
        result[name] = _steps(model, opt, loss_fn, amp, (lambda b=b: maker(b) for b in range(steps)),
                              cfg.channels_last)
    # Synthetic is measured before and after the real loader so that drift (thermal, caches) does not favour either.
    synth = (result["synthetic"] + result.pop("synthetic_again")) / 2
    return {"model": cfg.model, "img_size": spec.size, "batch_size": bs, "trainable": trainable or cfg.phase1.trainable,
            "real_images_per_s": result["real"], "synthetic_images_per_s": synth,
            "real_over_synthetic": result["real"] / synth}


def bench_bank(cfg: TrainConfig, steps: int = 20, warmup: int = 3) -> dict:
    """The fast path against today's phase 2, same model, batch and trainable layers: images/s of a training step
    on bank features (late stages only) versus on images (the frozen early stages run again every step)."""
    from dermtrain.fastfit import Ema
    from dermtrain.stages import Cut

    torch.set_num_threads(cfg.threads or torch.get_num_threads())
    spec = preprocess_spec(cfg)
    model = create_model(cfg.model).to(memory_format=torch.channels_last)
    cut = Cut(model, cfg.recipe.freeze_at)
    cut.freeze_early()
    late = [p for m in cut.late_modules() for p in m.parameters()]
    opt = torch.optim.AdamW(late, lr=1e-4)
    ema = Ema(model, cfg.recipe.ema)
    bs = cfg.batch_size
    x = torch.randn(bs, 3, spec.size, spec.size).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 7, (bs,))
    with torch.no_grad():
        f = cut.early(x).half()  # what the bank stores
    for m in cut.late_modules():
        m.train()

    def step(forward) -> None:
        loss = torch.nn.functional.cross_entropy(forward().float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema.update(model)

    def rate(forward) -> float:
        for _ in range(warmup):
            step(forward)
        t0 = time.perf_counter()
        for _ in range(steps):
            step(forward)
        return bs * steps / (time.perf_counter() - t0)

    bank = rate(lambda: cut.late(f.float().contiguous(memory_format=torch.channels_last)))
    full = rate(lambda: model(x))
    return {"model": cfg.model, "img_size": spec.size, "batch_size": bs, "frozen_stages": cfg.recipe.freeze_at,
            "bank_images_per_s": bank, "phase2_images_per_s": full, "speedup": bank / full}
