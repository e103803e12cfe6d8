"""The teacher for distillation: an ensemble of bank-trained runs, its log-probabilities for every bank view.

Each teacher's logits on view v of image i are its late stages applied to its own bank (the very features its
whole network computes), so caching them for all K x N views costs a few minutes, not a bank build per teacher.
The ensemble averages the teachers' probabilities (each with its validated prior shift folded in). A teacher
trained with a holdout (`dermtrain.folds`) speaks only for the images of its held-out fold: k of them, one per
fold, give every training image a target from a model that never saw it.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from dermtrain.bank import bank_for, default_cache_dir, view_params
from dermtrain.cache import build_cache, labels_of
from dermtrain.config import ConfigError, DistillConfig, TrainConfig
from dermtrain.data import Record
from dermtrain.folds import held_out
from dermtrain.metrics import summarize
from dermtrain.stages import Cut
from engines.engine import softmax
from engines.fsutil import atomic_path, write_json


def _check_compatible(name: str, tcfg: TrainConfig, cfg: TrainConfig, t_split: str, split_hash: str) -> None:
    r, tr = cfg.recipe, tcfg.recipe
    if tr is None or not tr.freeze_at:
        raise ConfigError(f"teacher {name}: not a bank-trained run (its config has no recipe with freeze_at > 0)")
    if t_split != split_hash:
        raise ConfigError(f"teacher {name}: trained on another split manifest")
    for what, a, b in (("views", tr.views, r.views), ("seed", tcfg.seed, cfg.seed),
                       ("augmentation", tcfg.augment, cfg.augment), ("limit", tcfg.limit, cfg.limit)):
        if a != b:
            raise ConfigError(f"teacher {name}: {what} {a} differs from the student's {b}: the views would differ")


def speaks_for(tcfg: TrainConfig, train_recs: list[Record]) -> np.ndarray:
    """Which training images a teacher's targets may be used on: all, or those of the fold it did not fit."""
    h = tcfg.recipe.holdout
    return held_out(train_recs, h) if h is not None else np.ones(len(train_recs), bool)


LoadedTeacher = tuple[TrainConfig, Cut, np.ndarray]


def teacher_bank(run_dir: Path, cfg: TrainConfig, train_recs: list[Record], split_hash: str,
                 cache_dir: Path | None, progress: bool, device: torch.device | None = None) -> LoadedTeacher:
    """A teacher's config, its model cut where its bank was, and its bank on the student's views (cached or built).
    The teacher runs on the student's device: the bank key records bf16 as that device computes it, so a teacher
    built on a GPU is found again by a student on that GPU, and a bank build or the view logits run there."""
    from dermtrain.evaluate import load_run_model

    model, tcfg, tspec, state = load_run_model(run_dir)
    model.to(device or torch.device("cpu"))
    _check_compatible(str(run_dir), tcfg, cfg, state["split_sha256"], split_hash)
    params = view_params(len(train_recs), tcfg.recipe.views, tcfg.augment, tcfg.seed)
    cut = Cut(model, tcfg.recipe.freeze_at)

    def images() -> np.ndarray:  # at the teacher's own preprocessing; only when its bank is not cached
        return build_cache(train_recs, tspec, f"caching train for teacher {run_dir.name}", progress)[0]

    bank = bank_for(tcfg, cut, images, params, tspec, split_hash, cache_dir, progress)
    model.to(memory_format=torch.channels_last)  # in place: the cut runs the late stages channels-last
    return tcfg, cut, bank


@torch.no_grad()
def teacher_view_logp(run_dir: Path, cfg: TrainConfig, train_recs: list[Record], split_hash: str,
                      cache_dir: Path | None, progress: bool, loaded: LoadedTeacher | None = None,
                      device: torch.device | None = None) -> tuple[np.ndarray, np.ndarray]:
    """K x N x 7 log-probabilities of one teacher on the student's views (NaN on the images it does not speak for:
    a fold teacher runs on its fold only), and the N images it speaks for. `loaded`: the teacher's
    `teacher_bank`, when the caller holds it already."""
    tcfg, cut, bank = loaded or teacher_bank(run_dir, cfg, train_recs, split_hash, cache_dir, progress, device)
    device = next(cut.model.parameters()).device
    mask = speaks_for(tcfg, train_recs)
    idx = np.flatnonzero(mask)
    logits = np.empty((bank.shape[0], len(idx), 7), np.float32)
    for v in tqdm(range(bank.shape[0]), desc=f"teacher {run_dir.name} on the views", unit="view", disable=not progress,
                  leave=False):
        for i in range(0, len(idx), 256):
            f = torch.from_numpy(bank[v, idx[i:i + 256]]).to(device).float()
            f = f.contiguous(memory_format=torch.channels_last)
            logits[v, i:i + 256] = cut.late(f).float().cpu().numpy()
    out = np.full((bank.shape[0], bank.shape[1], 7), np.nan, np.float32)
    out[:, idx] = np.log(softmax(logits.reshape(-1, 7)).reshape(logits.shape) + 1e-12)
    return out, mask


def teacher_targets(d: DistillConfig, cfg: TrainConfig, train_recs: list[Record], split_hash: str, run_root: Path,
                    cache_dir: Path | None, progress: bool, loaded: dict[Path, LoadedTeacher] | None = None,
                    device: torch.device | None = None) -> np.ndarray:
    """K x N x 7 ensemble log-probabilities, kept in the run folder as teacher_logp.npz (keyed by the teachers'
    checkpoints) and in the bank cache, where another student on the same views finds them; how close they sit to
    the labels goes to teacher_targets.json. `loaded`: teachers the caller holds already (the hint's), by run
    folder, so none is loaded twice; `device`: where the others run (the student's)."""
    dirs = [Path(t) for t in d.teachers]
    for t in dirs:
        if not (t / "best.pt").is_file():
            raise ConfigError(f"teacher {t}: no best.pt")
    key = hashlib.sha256(b"".join(hashlib.sha256((t / "best.pt").read_bytes()).digest() for t in dirs)).hexdigest()
    shared = _shared_targets(cache_dir, key, cfg, split_hash)
    own = _own_targets(run_root, key)
    if own is not None:
        if not shared.is_file():  # targets made before the cache kept them, or copied in by hand: share them now
            _share(shared, own, key, _own_summary(run_root, own, train_recs, dirs))
        return own
    if shared.is_file():
        cached = np.load(shared)
        _keep(run_root, cached["logp"], key, {**json.loads(str(cached["summary"])), "teachers": [str(t) for t in dirs]})
        return cached["logp"]
    total, count = None, np.zeros(len(train_recs))
    fitted_by_a_speaker = np.zeros(len(train_recs), bool)  # a teacher without a holdout fitted every image
    for t in dirs:
        logp, mask = teacher_view_logp(t, cfg, train_recs, split_hash, cache_dir, progress, (loaded or {}).get(t),
                                       device)
        total = np.zeros_like(logp) if total is None else total
        total[:, mask] += np.exp(logp[:, mask])
        count += mask
        fitted_by_a_speaker |= mask.all()
    if (count == 0).any():
        raise ConfigError(f"teachers {', '.join(map(str, dirs))}: {int((count == 0).sum())} training images have no "
                          "teacher that may speak for them: teachers trained with --holdout F/K need every fold "
                          "0..K-1 among them")
    logp = np.log(total / count[None, :, None] + 1e-12).astype(np.float32)
    summary = {**_summary(logp, train_recs, dirs), "cross_fitted_share": float(np.mean(~fitted_by_a_speaker))}
    _keep(run_root, logp, key, summary)
    _share(shared, logp, key, summary)
    return logp


def _own_targets(run_root: Path, key: str) -> np.ndarray | None:
    """The run folder's targets when they come from these teachers' checkpoints (a resume, or a copy)."""
    path = run_root / "teacher_logp.npz"
    if not path.is_file():
        return None
    cached = np.load(path)
    return cached["logp"] if str(cached["key"]) == key else None


def _own_summary(run_root: Path, logp: np.ndarray, train_recs: list[Record], dirs: list[Path]) -> dict:
    """The run's teacher_targets.json; when it is missing, what the targets themselves tell (how many of them were
    cross-fitted is known only to the run that made them), written there too."""
    path = run_root / "teacher_targets.json"
    if path.is_file():
        return json.loads(path.read_text())
    summary = _summary(logp, train_recs, dirs)
    write_json(path, summary)
    return summary


def _summary(logp: np.ndarray, train_recs: list[Record], dirs: list[Path]) -> dict:
    """Which teachers, on how many views and images, and how close their view-averaged targets sit to the labels."""
    s = summarize(logp.mean(0), labels_of(train_recs))
    return {"teachers": [str(t) for t in dirs], "views": int(logp.shape[0]), "images": int(logp.shape[1]),
            "accuracy_on_train": s["accuracy"], "balanced_accuracy_on_train": s["balanced_accuracy"]}


def _shared_targets(cache_dir: Path | None, key: str, cfg: TrainConfig, split_hash: str) -> Path:
    """Where the bank cache keeps these teachers' targets on this student's views. Compatible teachers share the
    student's views (`_check_compatible`), so the views' signature and the teachers' checkpoints fix the targets."""
    views = {"teachers": key, "split": split_hash, "views": cfg.recipe.views, "seed": cfg.seed,
             "augment": cfg.augment.key_dict(), "limit": cfg.limit}
    name = hashlib.sha256(json.dumps(views, sort_keys=True).encode()).hexdigest()[:16]
    return (cache_dir or default_cache_dir()) / f"teacher-logp-{name}.npz"


def _share(shared: Path, logp: np.ndarray, key: str, summary: dict) -> None:
    """The bank cache's copy, where another student on the same views finds these targets."""
    shared.parent.mkdir(parents=True, exist_ok=True)
    _save_npz(shared, logp=logp, key=np.array(key), summary=np.array(json.dumps(summary)))


def _keep(run_root: Path, logp: np.ndarray, key: str, summary: dict) -> None:
    """The run's own record of its targets: teacher_logp.npz and teacher_targets.json."""
    write_json(run_root / "teacher_targets.json", summary)
    _save_npz(run_root / "teacher_logp.npz", logp=logp, key=np.array(key))


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
