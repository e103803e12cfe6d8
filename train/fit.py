"""`dermtrain fit`: two-phase training with focal loss, a checkpoint every epoch and exact resume."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

import dermtrain
from dermtrain import distributed as D
from dermtrain.augment import augment, normalize as torch_normalize, to_float_nchw
from dermtrain.cache import build_cache, labels_of
from dermtrain.config import TrainConfig
from dermtrain.data import Record, load_records
from dermtrain.losses import FocalLoss
from dermtrain.metrics import summarize
from dermtrain.models import create_model, default_norm, set_trainable, train_mode
from dermtrain.plots import training_curves_png
from dermtrain.precision import bf16_is_fast
from dermtrain.splits import SplitRow, manifest_sha256, read_manifest, select
from dermtrain.torchfile import CheckpointError, read_run_checkpoint
from engines.fsutil import atomic_path, write_json
from engines.labels import CLASS_CODES
from engines.preprocess import PreprocessSpec, normalize


class ResumeError(Exception):
    """A run folder that cannot be resumed; str() is one line."""


@dataclass(frozen=True)
class RunFiles:
    root: Path

    @property
    def config(self) -> Path: return self.root / "config.json"
    @property
    def run_info(self) -> Path: return self.root / "run.json"
    @property
    def split(self) -> Path: return self.root / "split.csv"
    @property
    def last(self) -> Path: return self.root / "last.pt"
    @property
    def best(self) -> Path: return self.root / "best.pt"
    @property
    def history(self) -> Path: return self.root / "history.json"
    @property
    def curves(self) -> Path: return self.root / "training_curves.png"


def preprocess_spec(cfg: TrainConfig) -> PreprocessSpec:
    mean, std = default_norm(cfg.model)
    return PreprocessSpec(size=cfg.img_size, resize=cfg.resize, mean=cfg.mean or mean, std=cfg.std or std)


def code_version() -> str:
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--tags"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=5)
        if out.returncode == 0 and out.stdout.strip():
            return f"{dermtrain.__version__}+{out.stdout.strip()}"
    except (OSError, subprocess.SubprocessError):
        pass
    return dermtrain.__version__


def amp_mode(cfg: TrainConfig, device: torch.device) -> str:
    """auto: bf16 where it is fast (`dermtrain.precision`; 1.25-1.46x on an AVX-512 CPU), else fp16 with loss scaling
    on a GPU, float32 on a CPU."""
    if cfg.amp != "auto":
        return cfg.amp
    if bf16_is_fast(device):
        return "bf16"
    return "fp16" if device.type == "cuda" else "off"


def amp_context(cfg: TrainConfig, device: torch.device):
    mode = amp_mode(cfg, device)
    if mode == "off":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if mode == "bf16" else torch.float16)


SAMPLING_POWER = {"uniform": 0.0, "sqrt": 0.5, "balanced": 1.0}  # images drawn with weight 1 / count ** power


def sampled_log_prior(labels: np.ndarray, sampling: str = "uniform") -> np.ndarray:
    """The log class prior a loss sees when these labels are drawn with `sampling` (add-one counts, flattened by
    class-balanced sampling): what logit adjustment subtracts and a prior shift adds back."""
    counts = np.bincount(labels, minlength=len(CLASS_CODES)).astype(np.float64) + 1.0
    counts **= 1 - SAMPLING_POWER[sampling]
    return np.log(counts / counts.sum()).astype(np.float32)


def split_log_prior(data_dir: Path, split_csv: Path, limit: int | None = None, seed: int = 0) -> np.ndarray:
    """The data's own log class prior: of the training images of a split manifest, as drawn uniformly."""
    return train_log_prior(read_manifest(split_csv), load_records(data_dir), limit, seed)


def train_log_prior(rows: list[SplitRow], records: list[Record], limit: int | None = None,
                    seed: int = 0) -> np.ndarray:
    """split_log_prior of a manifest and metadata already read."""
    return sampled_log_prior(labels_of(select(rows, records, "train", limit, seed)))


def sample_order(labels: np.ndarray, sampling: str, g: torch.Generator) -> torch.Tensor:
    """Positions into `labels` for one epoch: a permutation (uniform), or len(labels) draws with replacement
    weighted by 1 / class count ** power (sqrt, balanced)."""
    n = len(labels)
    if sampling == "uniform":
        return torch.randperm(n, generator=g)
    counts = np.bincount(labels, minlength=len(CLASS_CODES)).astype(np.float64)
    w = 1.0 / np.maximum(counts[labels], 1) ** SAMPLING_POWER[sampling]
    return torch.multinomial(torch.as_tensor(w), n, replacement=True, generator=g)


def epoch_order(labels: np.ndarray, cfg: TrainConfig, epoch: int) -> torch.Tensor:
    """The sample order of one epoch, a function of (seed, epoch) alone so that resume replays it."""
    return sample_order(labels, cfg.sampling, torch.Generator().manual_seed(cfg.seed * 100_003 + epoch))


@torch.no_grad()
def predict_logits(model: nn.Module, images_u8: np.ndarray, spec: PreprocessSpec, device: torch.device,
                   batch: int = 128, amp=None, channels_last: bool = True) -> np.ndarray:
    """Logits for cached uint8 images through the shared (engines) evaluation preprocessing."""
    model.eval()
    out = []
    for i in range(0, len(images_u8), batch):
        x = torch.from_numpy(normalize(images_u8[i:i + batch], spec)).to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with amp or nullcontext():
            out.append(model(x).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, len(CLASS_CODES)), np.float32)


def write_run_files(run: RunFiles, cfg: TrainConfig, split_path: Path, split_hash: str, data_dir: Path,
                    spec: PreprocessSpec, extra: dict) -> None:
    """The resolved config, a copy of the split manifest and what produced the run, beside its checkpoints."""
    run.root.mkdir(parents=True, exist_ok=True)
    write_json(run.config, cfg.to_dict())
    if split_path.resolve() != run.split.resolve():
        with atomic_path(run.split) as tmp:
            tmp.write_bytes(split_path.read_bytes())
    write_json(run.run_info, {
        "code_version": code_version(), "split_sha256": split_hash, "split_source": str(split_path),
        "data_dir": str(data_dir), "preprocess": spec.to_dict(), "classes": list(CLASS_CODES),
        "torch": torch.__version__, "python": platform.python_version(), **extra,
    })


def save_checkpoint(path: Path, state: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _make_optimizer(model: nn.Module, cfg: TrainConfig, lr: float):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=cfg.plateau_factor,
                                                       patience=cfg.plateau_patience)
    return opt, sched


def fit(cfg: TrainConfig, data_dir: Path, split_path: Path, out_dir: Path, resume: bool = False,
        progress: bool = True, device: str = "auto") -> dict:
    if cfg.recipe is not None:
        from dermtrain.fastfit import fit_fast
        return fit_fast(cfg, data_dir, split_path, RunFiles(Path(out_dir)), resume, progress, device)
    info = D.setup()
    try:
        return _fit(cfg, data_dir, split_path, RunFiles(Path(out_dir)), resume, progress and info.main, info)
    finally:
        D.teardown(info)


def _fit(cfg: TrainConfig, data_dir: Path, split_path: Path, run: RunFiles, resume: bool, progress: bool,
         info: D.DistInfo) -> dict:
    device = D.device_for(info)
    torch.set_num_threads(cfg.threads or max(1, (os.cpu_count() or 1) // info.world))
    split_hash = manifest_sha256(split_path)
    state = load_resume(run, cfg, split_hash) if resume else None
    if not resume and run.last.exists():
        raise ResumeError(f"{run.root}: already holds a run; pass --resume to continue it or pick a new --out")

    spec = preprocess_spec(cfg)
    torch.manual_seed(cfg.seed)  # the model first: a bad name or missing weights fail before any file is written
    model = create_model(cfg.model, cfg.pretrained, cfg.init, cfg.drop_rate, cfg.drop_path_rate).to(device)
    records = load_records(data_dir)
    rows = read_manifest(split_path)
    train_recs = select(rows, records, "train", cfg.limit, cfg.seed)
    val_recs = select(rows, records, "val", cfg.limit, cfg.seed)
    if info.main:
        write_run_files(run, cfg, split_path, split_hash, data_dir, spec,
                        {"n_train": len(train_recs), "n_val": len(val_recs), "world_size": info.world,
                         "device": str(device)})

    train_x, train_y = build_cache(train_recs, spec, "caching train", progress)
    val_x, val_y = build_cache(val_recs, spec, "caching val", progress) if info.main else (None, None)

    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    loss_fn = FocalLoss(cfg.focal_gamma, cfg.focal_alpha).to(device)
    amp = amp_context(cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_mode(cfg, device) == "fp16")
    val_loss_fn = FocalLoss(cfg.focal_gamma, cfg.focal_alpha)  # on the CPU, where the validation logits are

    history: list[dict] = []
    best = -1.0
    start = 0
    if state is not None:
        model.load_state_dict(state["model"])
        history, best, start = state["history"], state["best_balanced_acc"], state["epoch"]

    net, opt, sched, phase = model, None, None, None
    for epoch in range(start, cfg.total_epochs):
        ph_no = 1 if epoch < cfg.phase1.epochs else 2
        ph = cfg.phase1 if ph_no == 1 else cfg.phase2
        if ph_no != phase:
            phase = ph_no
            set_trainable(model, ph.trainable)
            opt, sched = _make_optimizer(model, cfg, ph.lr)
            if state is not None and state["phase"] == phase and epoch == start:
                opt.load_state_dict(state["optimizer"])
                sched.load_state_dict(state["scheduler"])
            net = nn.parallel.DistributedDataParallel(model) if info.enabled else model
        torch.manual_seed(cfg.seed * 1_000 + epoch)  # dropout / drop-path draws replay on resume
        t0 = time.perf_counter()
        tr = _train_epoch(net, model, train_x, train_y, cfg, spec, epoch, opt, loss_fn, amp, scaler, device,
                          info, progress, f"epoch {epoch + 1}/{cfg.total_epochs} (phase {phase})")
        seconds = time.perf_counter() - t0

        improved = False
        if info.main:
            logits = predict_logits(model, val_x, spec, device, cfg.eval_batch_size, amp, cfg.channels_last)
            s = summarize(logits, val_y)
            val_loss = float(val_loss_fn(torch.from_numpy(logits), torch.from_numpy(val_y)))
            rec = {"epoch": epoch + 1, "phase": phase, "lr": opt.param_groups[0]["lr"], **tr,
                   "val_loss": val_loss, "val_acc": s["accuracy"], "val_balanced_acc": s["balanced_accuracy"],
                   "val_mel_recall": s["per_class"]["mel"], "seconds": round(seconds, 1)}
            history.append(rec)
            improved = s["balanced_accuracy"] > best
            best = max(best, s["balanced_accuracy"])
            if progress:
                tqdm.write(f"epoch {epoch + 1}: loss {tr['train_loss']:.4f} val_loss {val_loss:.4f} "
                           f"val_acc {s['accuracy']:.3f} val_bal_acc {s['balanced_accuracy']:.3f} "
                           f"mel_recall {s['per_class']['mel']:.3f} ({tr['images_per_s']:.0f} img/s)")
        # Every rank steps the plateau scheduler on the main rank's validation score.
        val_score = D.all_reduce_sum(info, [history[-1]["val_balanced_acc"] if info.main else 0.0])[0]
        sched.step(val_score)
        if info.main:
            ckpt = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                    "epoch": epoch + 1, "phase": phase, "history": history, "best_balanced_acc": best,
                    "config": cfg.to_dict(), "preprocess": spec.to_dict(), "split_sha256": split_hash,
                    "classes": list(CLASS_CODES), "code_version": code_version()}
            save_checkpoint(run.last, ckpt)
            if improved:
                save_checkpoint(run.best, ckpt)
            write_json(run.history, history)
            training_curves_png(history, cfg.phase1.epochs, run.curves)
        D.barrier(info)
    return {"best_balanced_acc": best, "epochs": cfg.total_epochs, "history": history}


def _train_epoch(net, model, xs, ys, cfg, spec, epoch, opt, loss_fn, amp, scaler, device, info, progress, desc):
    order = epoch_order(ys, cfg, epoch)
    order = order[: len(order) // info.world * info.world][info.rank::info.world]
    bs = cfg.batch_size
    n_batches = max(1, len(order) // bs) if len(order) >= bs else 1
    g = torch.Generator().manual_seed(cfg.seed * 7_919 + epoch * 31 + info.rank)
    train_mode(model)
    loss_sum = correct = seen = 0.0
    t0 = time.perf_counter()
    bar = tqdm(range(n_batches), desc=desc, unit="batch", disable=not progress, leave=False)
    for b in bar:
        idx = order[b * bs:(b + 1) * bs].numpy()
        x = to_float_nchw(torch.from_numpy(xs[idx]))
        x = torch_normalize(augment(x, cfg.augment, g), spec.mean, spec.std).to(device)
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = torch.from_numpy(ys[idx]).to(device)
        with amp:
            logits = net(x)
        loss = loss_fn(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        loss_sum += float(loss.detach()) * len(idx)
        correct += float((logits.argmax(1) == y).sum())
        seen += len(idx)
        bar.set_postfix(loss=f"{loss_sum / seen:.3f}", img_s=f"{seen * info.world / (time.perf_counter() - t0):.0f}")
    loss_sum, correct, seen = D.all_reduce_sum(info, [loss_sum, correct, seen])
    elapsed = time.perf_counter() - t0
    return {"train_loss": loss_sum / seen, "train_acc": correct / seen, "images_per_s": seen / elapsed}


def load_resume(run: RunFiles, cfg: TrainConfig, split_hash: str) -> dict:
    if not run.last.is_file():
        raise ResumeError(f"{run.root}: nothing to resume (no last.pt)")
    try:
        state = read_run_checkpoint(run.last)
    except CheckpointError as e:
        raise ResumeError(f"{e}: cannot resume from it") from None
    if state.get("split_sha256") != split_hash:
        raise ResumeError(f"{run.last}: was trained on another split manifest (sha256 differs)")
    saved = json.loads(json.dumps(state["config"]))
    now = json.loads(json.dumps(cfg.to_dict()))
    # A resumed run may get more epochs or another thread count; anything else would be a different run.
    diff = sorted(k for k in now if now[k] != saved.get(k) and k not in ("phase1", "phase2", "threads"))
    if diff:
        raise ResumeError(f"{run.last}: the config differs from the saved run in {', '.join(diff)}")
    return state
