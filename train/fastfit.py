"""`dermtrain fit` with a recipe: many epochs over K fixed augmented views, from a feature bank or end to end.

- freeze_at > 0 (teachers): the frozen early stages ran once per view into the bank (`dermtrain.bank`); each step
  runs only the late stages and the head.
- freeze_at = 0 (students): the whole network trains on the same views, and with `distill` learns the teachers'
  soft targets for each view (`dermtrain.distill`) beside the labels, and with `distill.hint` the first teacher's
  bank features too (`dermtrain.hints`); with `dihedral` each step also mirrors or transposes its views at random,
  against the same targets (the hint's feature maps turn with them). With `mixup` each batch is blended with a
  permutation of itself (images or bank features), and its loss with the same weights; with `cutmix` a box of
  each input is pasted from its partner instead (half the batches each when both are set).
Both use a one-cycle or cosine schedule with warm-up, an EMA of the weights (BatchNorm buffers included), label
smoothing and a class-balanced loss. `best.pt` holds the EMA weights with `prior_shift` x log-prior folded into
the classifier bias, the shift chosen on validation: the ONNX export and every runtime then run those logits.
"""
from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from dermtrain.augment import AugmentParams, apply_dihedral, draw_batch_mix, draw_dihedral
from dermtrain.bank import Images, bank_for, bank_rows, early_features, make_views, view_params
from dermtrain.cache import build_cache, labels_of
from dermtrain.config import Recipe, TrainConfig
from dermtrain.data import load_records
from dermtrain.fit import (RunFiles, ResumeError, amp_context, code_version, load_resume,
                           predict_logits, preprocess_spec, sample_order, sampled_log_prior, save_checkpoint,
                           write_run_files)
from dermtrain.folds import fitted_indices
from dermtrain.losses import FocalLoss
from dermtrain.metrics import summarize
from dermtrain.models import classifier_bias_key, create_model, train_mode
from dermtrain.plots import training_curves_png
from dermtrain.splits import manifest_sha256, read_manifest, select
from dermtrain.stages import Cut
from engines.fsutil import write_json
from engines.labels import CLASS_CODES


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ResumeError(f"--device {name}: no CUDA device is available to torch here")
    return torch.device(name)


class Ema:
    """Exponential moving average of every floating tensor of the state dict (weights and BatchNorm buffers),
    with timm's warm-up so that the first steps do not stay anchored to the initial weights."""

    def __init__(self, model: nn.Module, decay: float, state: dict | None = None, updates: int = 0):
        self.decay, self.updates = decay, updates
        self.state = state or {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                self.state[k].mul_(d).add_(v.detach(), alpha=1 - d)
            else:
                self.state[k].copy_(v)


def make_schedule(opt, r: Recipe, total_steps: int):
    if r.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=r.lr, total_steps=total_steps,
                                                   pct_start=max(r.warmup, 1e-3), anneal_strategy="cos")
    warm = max(1, int(r.warmup * total_steps))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total_steps - warm))))
    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def label_loss(r: Recipe, log_prior: torch.Tensor, focal_gamma: float) -> Callable:
    if r.loss == "focal":
        focal = FocalLoss(focal_gamma)
        return lambda logits, y: focal(logits, y)
    shift = r.tau * log_prior if r.loss == "logit_adjusted" else torch.zeros_like(log_prior)
    return lambda logits, y: F.cross_entropy(logits + shift, y, label_smoothing=r.label_smoothing)


def distill_loss(student: torch.Tensor, target_logp: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) at a temperature, scaled by T^2 so its gradients match the label loss's."""
    t = temperature
    p_teacher = F.softmax(target_logp / t, dim=1)
    return F.kl_div(F.log_softmax(student / t, dim=1), p_teacher, reduction="batchmean") * t * t


def choose_prior_shift(logits: np.ndarray, y: np.ndarray, log_prior: np.ndarray, grid) -> tuple[float, dict]:
    """The share of the log-prior to add back to the logits that maximises validation balanced accuracy (ties: the
    higher accuracy)."""
    best = None
    for beta in grid:
        s = summarize(logits + beta * log_prior, y)
        score = (round(s["balanced_accuracy"], 6), s["accuracy"])
        if best is None or score > best[0]:
            best = (score, float(beta), s)
    return best[1], best[2]


def prior_grid(r: Recipe) -> tuple[float, ...]:
    """The prior shifts validation chooses from."""
    if r.distill is None:
        return tuple(r.prior_grid)
    # The teachers' targets already carry their own prior shift, so a student may need to take some back.
    return tuple(sorted(set(r.prior_grid) | {-0.25, -0.125}))


@dataclass
class Inputs:
    """What one training step feeds the trainable part: bank features, or views made on the fly."""
    batch: Callable[[np.ndarray, np.ndarray], torch.Tensor]  # (image indices, view indices) -> input tensor
    forward: Callable[[nn.Module, torch.Tensor], torch.Tensor]  # (model, input) -> logits
    val_logits: Callable[[nn.Module], np.ndarray]
    trainable: list[nn.Module]
    bank_seconds: float = 0.0


def bank_inputs(model: nn.Module, cfg: TrainConfig, spec, train_images: Images, val_x, params: AugmentParams,
                split_hash: str, device: torch.device, cache_dir: Path | None, progress: bool) -> Inputs:
    r = cfg.recipe
    cut = Cut(model, r.freeze_at)
    t0 = time.perf_counter()
    bank = bank_for(cfg, cut, train_images, params, spec, split_hash, cache_dir, progress)
    seconds = time.perf_counter() - t0
    val_feats = early_features(cut, val_x, None, spec, desc="validation features", progress=progress)

    def late(net: nn.Module, f: torch.Tensor) -> torch.Tensor:
        return Cut(net, r.freeze_at).late(f)

    @torch.no_grad()
    def val_logits(net: nn.Module) -> np.ndarray:
        net.eval()
        out = [late(net, _dev(torch.from_numpy(val_feats[i:i + 256]).float(), device)).float().cpu().numpy()
               for i in range(0, len(val_feats), 256)]
        return np.concatenate(out)

    rows = bank_rows(bank, device)
    return Inputs(batch=lambda idx, v: _dev(rows(idx, v).float(), device), forward=late,
                  val_logits=val_logits, trainable=cut.late_modules(), bank_seconds=seconds)


def view_inputs(model: nn.Module, cfg: TrainConfig, spec, train_x, val_x, params: AugmentParams,
                device: torch.device) -> Inputs:
    def batch(idx, v):
        return _dev(make_views(train_x[idx], params.take((torch.from_numpy(v), torch.from_numpy(idx))), spec, device),
                    device)

    return Inputs(batch=batch, forward=lambda net, x: net(x),
                  val_logits=lambda net: predict_logits(net, val_x, spec, device, cfg.eval_batch_size, None, True),
                  trainable=[model])


def _dev(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    return x.to(device).contiguous(memory_format=torch.channels_last)


def fit_fast(cfg: TrainConfig, data_dir: Path, split_path: Path, run: RunFiles, resume: bool, progress: bool,
             device_name: str = "auto", cache_dir: Path | None = None) -> dict:
    r = cfg.recipe
    device = resolve_device(device_name)
    torch.set_num_threads(cfg.threads or os.cpu_count() or 1)
    split_hash = manifest_sha256(split_path)
    state = load_resume(run, cfg, split_hash) if resume else None
    if not resume and run.last.exists():
        raise ResumeError(f"{run.root}: already holds a run; pass --resume to continue it or pick a new --out")

    spec = preprocess_spec(cfg)
    seed = cfg.seed if r.train_seed is None else r.train_seed  # the run's draws; cfg.seed keeps fixing the views
    torch.manual_seed(seed)
    model = create_model(cfg.model, cfg.pretrained, cfg.init, cfg.drop_rate, cfg.drop_path_rate)
    model = model.to(device).to(memory_format=torch.channels_last)
    records = load_records(data_dir)
    rows = read_manifest(split_path)
    train_recs = select(rows, records, "train", cfg.limit, cfg.seed)
    val_recs = select(rows, records, "val", cfg.limit, cfg.seed)
    fitted = fitted_indices(train_recs, r.holdout)  # the bank keeps every training image; a holdout skips some
    write_run_files(run, cfg, split_path, split_hash, data_dir, spec,
                    {"n_train": len(train_recs), "n_fitted": len(fitted), "n_val": len(val_recs),
                     "device": str(device), "path": "fast"})
    train_y = labels_of(train_recs)
    val_x, val_y = build_cache(val_recs, spec, "caching val", progress)
    params = view_params(len(train_recs), r.views, cfg.augment, cfg.seed)

    def train_images() -> np.ndarray:  # a bank run needs them only when its bank is not cached
        return build_cache(train_recs, spec, "caching train", progress)[0]
    # The class prior the loss sees: the fitted images' frequencies, flattened by class-balanced sampling.
    log_prior_np = sampled_log_prior(train_y[fitted], cfg.sampling)
    log_prior = torch.from_numpy(log_prior_np).to(device)

    if r.freeze_at:
        inputs = bank_inputs(model, cfg, spec, train_images, val_x, params, split_hash, device, cache_dir, progress)
    else:
        inputs = view_inputs(model, cfg, spec, train_images(), val_x, params, device)
    hint, loaded = None, {}
    if r.distill is not None and r.distill.hint:
        from dermtrain.distill import teacher_bank
        from dermtrain.hints import FeatureHint
        first = Path(r.distill.teachers[0])
        loaded[first] = teacher_bank(first, cfg, train_recs, split_hash, cache_dir, progress, device)
        hint = FeatureHint(model, r.distill.hint_at, loaded[first][2], spec.size)
    teacher = None
    if r.distill is not None:
        from dermtrain.distill import teacher_targets
        teacher = torch.from_numpy(teacher_targets(r.distill, cfg, train_recs, split_hash, run.root, cache_dir,
                                                   progress, loaded, device))
    del loaded  # the hint keeps the bank it needs; the teacher's model is not needed past its targets

    params_trainable = [p for m in inputs.trainable for p in m.parameters() if p.requires_grad]
    if hint is not None:
        params_trainable += list(hint.proj.parameters())
    opt = torch.optim.AdamW(params_trainable, lr=r.lr, weight_decay=cfg.weight_decay)
    n = len(fitted)
    bs = min(cfg.batch_size, n)
    steps = max(1, n // bs)
    sched = make_schedule(opt, r, r.epochs * steps)
    ema = Ema(model, r.ema) if r.ema else None
    base_loss = label_loss(r, log_prior, cfg.focal_gamma)
    amp = amp_context(cfg, device)
    history: list[dict] = []
    best, start = -1.0, 0
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        if ema is not None:
            ema = Ema(model, r.ema, state["ema"], state["ema_updates"])
        if hint is not None:
            hint.load_state_dict(state["hint"])
        history, best, start = state["history"], state["best_balanced_acc"], state["epoch"]
    grid = prior_grid(r)
    eval_model = copy.deepcopy(model) if ema is not None else model

    def objective(logits: torch.Tensor, idx: np.ndarray, v: np.ndarray, y: torch.Tensor) -> torch.Tensor:
        """The label loss of these images, blended with the teachers' soft targets for these views."""
        loss = base_loss(logits, y)
        if teacher is None:
            return loss
        a = r.distill.alpha
        soft = distill_loss(logits, teacher[torch.from_numpy(v), torch.from_numpy(idx)].to(device),
                            r.distill.temperature)
        return a * soft + (1 - a) * loss
    bias_key = classifier_bias_key(model)

    for epoch in range(start, r.epochs):
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = fitted[sample_order(train_y[fitted], cfg.sampling, g).numpy()]
        view = torch.randint(r.views, (n,), generator=g).numpy()
        torch.manual_seed(seed * 1_000 + epoch)  # dropout / drop-path draws replay on resume
        for m in inputs.trainable:
            train_mode(m, keep_bn_stats=r.bn_eval)
        t0 = time.perf_counter()
        loss_sum = hint_sum = correct = seen = 0.0
        bar = tqdm(range(steps), desc=f"epoch {epoch + 1}/{r.epochs}", unit="batch", disable=not progress,
                   leave=False)
        for b in bar:
            idx, v = order[b * bs:(b + 1) * bs], view[b * bs:(b + 1) * bs]
            y = torch.from_numpy(train_y[idx]).to(device)
            x = inputs.batch(idx, v)
            bits = draw_dihedral(len(idx)) if r.dihedral else None
            if bits is not None:
                x = apply_dihedral(x, bits)
            mix = draw_batch_mix(len(idx), r.mixup, r.cutmix, *x.shape[2:])
            if mix is not None:
                x = mix.apply(x)
            with amp:
                logits, features = hint(x) if hint is not None else (inputs.forward(model, x), None)
            logits = logits.float()
            loss = objective(logits, idx, v, y)
            if mix is not None:  # both losses are linear in the target, so this is the loss of the mixed target
                p = mix.partner.numpy()
                loss = mix.lam * loss + (1 - mix.lam) * objective(logits, idx[p], v[p], y[mix.partner.to(device)])
            if hint is not None:
                hint_loss = hint.loss(features, idx, v, bits)
                loss = loss + r.distill.hint * hint_loss
                hint_sum += float(hint_loss.detach()) * len(idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if ema is not None:
                ema.update(model)
            loss_sum += float(loss.detach()) * len(idx)
            correct += float((logits.argmax(1) == y).sum())
            seen += len(idx)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", img_s=f"{seen / (time.perf_counter() - t0):.0f}")
        seconds = time.perf_counter() - t0

        if ema is not None:
            eval_model.load_state_dict(ema.state)
        logits = inputs.val_logits(eval_model)
        beta, s = choose_prior_shift(logits, val_y, log_prior_np, grid)
        val_loss = float(F.cross_entropy(torch.from_numpy(logits + beta * log_prior_np), torch.from_numpy(val_y)))
        rec = {"epoch": epoch + 1, "phase": 0, "lr": opt.param_groups[0]["lr"], "train_loss": loss_sum / seen,
               "train_acc": correct / seen, "images_per_s": seen / seconds, "val_loss": val_loss,
               "val_acc": s["accuracy"], "val_balanced_acc": s["balanced_accuracy"],
               "val_mel_recall": s["per_class"]["mel"], "prior_shift": beta, "seconds": round(seconds, 1)}
        if hint is not None:
            rec["train_hint_loss"] = hint_sum / seen
        if epoch == 0 and inputs.bank_seconds:
            rec["bank_seconds"] = round(inputs.bank_seconds, 1)
        history.append(rec)
        improved = s["balanced_accuracy"] > best
        best = max(best, s["balanced_accuracy"])
        if progress:
            tqdm.write(f"epoch {epoch + 1}: loss {rec['train_loss']:.4f} val_acc {s['accuracy']:.3f} "
                       f"val_bal_acc {s['balanced_accuracy']:.3f} mel_recall {s['per_class']['mel']:.3f} "
                       f"prior_shift {beta:g} ({rec['images_per_s']:.0f} img/s)")
        common = {"epoch": epoch + 1, "phase": 0, "history": history, "best_balanced_acc": best,
                  "config": cfg.to_dict(), "preprocess": spec.to_dict(), "split_sha256": split_hash,
                  "classes": list(CLASS_CODES), "code_version": code_version()}
        save_checkpoint(run.last, {**common, "model": model.state_dict(), "optimizer": opt.state_dict(),
                                   "scheduler": sched.state_dict(), "ema": ema.state if ema else None,
                                   "ema_updates": ema.updates if ema else 0,
                                   "hint": hint.state_dict() if hint is not None else None})
        if improved:
            deploy = {k: v.detach().clone().cpu() for k, v in eval_model.state_dict().items()}
            deploy[bias_key] += beta * torch.from_numpy(log_prior_np)
            save_checkpoint(run.best, {**common, "model": deploy, "prior_shift": beta,
                                       "log_prior": log_prior_np.tolist()})
        write_json(run.history, history)
        training_curves_png(history, 0, run.curves)
    return {"best_balanced_acc": best, "epochs": r.epochs, "history": history}
