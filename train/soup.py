"""`dermtrain soup`: one model from the averaged weights of several runs of one recipe (a uniform model soup,
Wortsman et al. 2022), at the latency of one.

Runs of a fast-path recipe fine-tune the same ImageNet weights behind the same frozen stages. Where their weights
lie in one basin their average can score above each of them; where they do not it scores below both, and only
validation tells (`docs/ablation.md`: two training seeds of the Lite0 default did not, two mixup alphas of one seed
came nearer). Each run's `best.pt` carries its own prior shift in the classifier bias (`dermtrain.fastfit`): the
soup averages the unshifted weights, lets the BatchNorm layers of the trained stages take their statistics again
from training images (as stochastic weight averaging does), and chooses its own shift on validation, as a run does
every epoch. A greedy soup keeps only the runs that raise its validation score. The result is an ordinary run
folder (config, split, `best.pt`, `run.json` naming the ingredients) that `dermtrain eval` and `dermconvert` take
as they take any run.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dermtrain.cache import build_cache
from dermtrain.config import from_dict
from dermtrain.data import load_records
from dermtrain.evaluate import EvalError, load_checkpoint, tta_logits
from dermtrain.fastfit import choose_prior_shift, prior_grid
from dermtrain.fit import RunFiles, save_checkpoint, write_run_files
from dermtrain.models import classifier_bias_key, create_model, without_prior_shift
from dermtrain.splits import manifest_sha256, read_manifest, select
from dermtrain.stages import Cut
from engines.preprocess import PreprocessSpec, normalize

REFRESH_IMAGES = 2048  # training images whose statistics the soup's BatchNorm layers take
# What every ingredient must share for its weights to mean the same thing; the recipe may differ in its draws.
SAME = ("model", "img_size", "init", "freeze_at", "split_sha256", "log_prior", "classes")


@dataclass(frozen=True, eq=False)  # one per run loaded: compared by identity
class Ingredient:
    run: Path
    epoch: int | str  # a soup's own 'epoch' names its ingredients
    val_balanced_acc: float
    state: dict


@dataclass(frozen=True)
class SoupResult:
    ingredients: list[Ingredient]  # in the soup
    left_out: list[Ingredient]  # tried by a greedy soup and not kept
    prior_shift: float
    val: dict  # summarize() of the soup on validation


def _load(run_dir: Path) -> Ingredient:
    state = load_checkpoint(run_dir)
    if "log_prior" not in state:
        raise EvalError(f"{RunFiles(run_dir).best}: not a fast-path run (no prior shift in its checkpoint); a soup needs `recipe` runs")
    return Ingredient(Path(run_dir), state["epoch"], float(state["best_balanced_acc"]), state)


def _signature(ing: Ingredient) -> dict:
    cfg = ing.state["config"]
    return {"model": cfg["model"], "img_size": cfg["img_size"], "init": cfg.get("init"),
            "freeze_at": (cfg.get("recipe") or {}).get("freeze_at"), "split_sha256": ing.state["split_sha256"],
            "log_prior": [round(v, 6) for v in ing.state["log_prior"]], "classes": ing.state["classes"]}


def training_time(run_dir: Path) -> dict:
    """Epochs and minutes of a run (its epochs plus the feature bank build), from its history; a soup's own record
    keeps each ingredient's."""
    hist_path = RunFiles(run_dir).history
    hist = json.loads(hist_path.read_text()) if hist_path.is_file() else []
    return {"epochs": len(hist),
            "minutes": round(sum(h.get("seconds", 0) + h.get("bank_seconds", 0) for h in hist) / 60, 1)}


def average(weights: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The mean of each floating-point tensor; counters (BatchNorm's num_batches_tracked) from the first."""
    return {k: (torch.stack([w[k] for w in weights]).mean(0) if v.is_floating_point() else v.clone())
            for k, v in weights[0].items()}


def _refresh_images(split: Path, data_dir: Path, cfg, spec: PreprocessSpec, progress: bool) -> np.ndarray:
    """A fixed sample of the training images (un-augmented) for the soup's BatchNorm statistics."""
    recs = select(read_manifest(split), load_records(data_dir), "train", cfg.limit, cfg.seed)
    pick = np.random.default_rng(cfg.seed).permutation(len(recs))[:REFRESH_IMAGES]
    return build_cache([recs[i] for i in sorted(pick)], spec, "caching training sample", progress)[0]


def refresh_batchnorm(model: nn.Module, images_u8: np.ndarray, spec: PreprocessSpec, modules: list[nn.Module],
                      batch: int = 128) -> int:
    """Recompute the running statistics of the BatchNorm layers inside `modules` over `images_u8` (a cumulative
    average), the rest of the model in eval mode; returns how many layers. Averaged weights do not produce the
    averaged statistics: without this a soup of two Lite0 runs scored 67.8% on validation, with it 72.1%."""
    bns = [m for mod in modules for m in mod.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in bns]
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    with torch.no_grad():
        for i in range(0, len(images_u8), batch):
            model(torch.from_numpy(normalize(images_u8[i:i + batch], spec)).contiguous(
                memory_format=torch.channels_last))
    for m, momentum in zip(bns, momenta):
        m.momentum = momentum
        m.eval()
    return len(bns)


def _check(ings: list[Ingredient]) -> None:
    first = _signature(ings[0])
    for ing in ings[1:]:
        sig = _signature(ing)
        diff = [k for k in SAME if sig[k] != first[k]]
        if diff:
            raise EvalError(f"{ing.run}: differs from {ings[0].run} in {', '.join(diff)}; its weights cannot be "
                            "averaged with them")


def _record(ing: Ingredient) -> dict:
    r = ing.state["config"].get("recipe") or {}
    return {"run": str(ing.run), "epoch": ing.epoch, "val_balanced_acc": ing.val_balanced_acc,
            "train_seed": ing.state["config"]["seed"] if r.get("train_seed") is None else r["train_seed"],
            "mixup": r.get("mixup"), **training_time(ing.run)}


def make_soup(run_dirs: list[Path], data_dir: Path, out: Path, greedy: bool = False,
              progress: bool = True) -> SoupResult:
    """The uniform soup of `run_dirs`, or with `greedy` (Wortsman et al.'s greedy soup): the runs in order of their
    validation score, each kept only if the soup's validation balanced accuracy rises with it."""
    if len(run_dirs) < 2:
        raise EvalError("a soup needs at least two runs")
    if RunFiles(out).best.exists():
        raise EvalError(f"{out}: already holds a model; pick a new --out")
    ings = [_load(Path(r)) for r in run_dirs]
    _check(ings)
    split = RunFiles(ings[0].run).split
    if manifest_sha256(split) != ings[0].state["split_sha256"]:
        raise EvalError(f"{split}: differs from the manifest the model was trained on")

    cfg = from_dict(ings[0].state["config"])
    spec = PreprocessSpec.from_dict(ings[0].state["preprocess"])
    model = create_model(cfg.model, drop_rate=cfg.drop_rate, drop_path_rate=cfg.drop_path_rate).eval()
    bias_key = classifier_bias_key(model)
    val_recs = select(read_manifest(split), load_records(data_dir), "val", cfg.limit, cfg.seed)
    val_x, val_y = build_cache(val_recs, spec, "caching val", progress)
    log_prior = np.asarray(ings[0].state["log_prior"], dtype=np.float32)

    late = Cut(model, cfg.recipe.freeze_at).late_modules() if cfg.recipe.freeze_at else [model]
    refresh_x: np.ndarray | None = None

    def taste(members: list[Ingredient]) -> tuple[float, dict, dict]:
        """(prior shift, validation summary, unshifted weights) of the soup of `members`."""
        nonlocal refresh_x
        weights = [without_prior_shift(i.state, bias_key) for i in members]
        model.load_state_dict(average(weights))
        if not all(torch.equal(w[k], weights[0][k]) for w in weights[1:] for k in w):
            if refresh_x is None:
                refresh_x = _refresh_images(split, data_dir, cfg, spec, progress)
            refresh_batchnorm(model, refresh_x, spec, late, cfg.eval_batch_size)
        logits = tta_logits(model, val_x, spec, "none", cfg.eval_batch_size)
        beta, summary = choose_prior_shift(logits, val_y, log_prior, prior_grid(cfg.recipe))
        return beta, summary, {k: v.clone() for k, v in model.state_dict().items()}

    if greedy:
        ings = sorted(ings, key=lambda i: -i.val_balanced_acc)
        chosen, best = ings[:1], taste(ings[:1])
        for ing in ings[1:]:
            trial = taste(chosen + [ing])
            if trial[1]["balanced_accuracy"] > best[1]["balanced_accuracy"]:
                chosen, best = chosen + [ing], trial
    else:
        chosen, best = ings, taste(ings)
    beta, summary, weights = best
    left_out = [i for i in ings if i not in chosen]
    base = chosen[0].state  # whose config the soup keeps: the first run given (a greedy soup: the best); all share SAME

    deploy = dict(weights)
    deploy[bias_key] = deploy[bias_key] + beta * torch.from_numpy(log_prior)
    run = RunFiles(out)
    write_run_files(run, from_dict(base["config"]), split, base["split_sha256"], data_dir, spec,
                    {"path": "soup", "greedy": greedy, "soup": [_record(i) for i in chosen],
                     "left_out": [_record(i) for i in left_out], "prior_shift": beta,
                     "val_accuracy": summary["accuracy"], "val_balanced_acc": summary["balanced_accuracy"]})
    save_checkpoint(run.best, {**{k: base[k] for k in ("config", "preprocess", "split_sha256", "classes", "log_prior",
                                                       "code_version")},
                               "epoch": "soup of " + ", ".join(f"{i.run.name} (epoch {i.epoch})" for i in chosen),
                               "phase": 0, "history": None, "best_balanced_acc": summary["balanced_accuracy"],
                               "model": deploy, "prior_shift": beta})
    return SoupResult(chosen, left_out, beta, summary)
