"""Training configuration: a dataclass, JSON presets (`seed`, `cpu`, ...) and files of the same shape."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from dermtrain.augment import AugmentConfig
from dermtrain.folds import valid_holdout

PRESET_DIR = Path(__file__).parent / "configs"


class ConfigError(Exception):
    """A config that cannot be used; str() is one line."""


@dataclass(frozen=True)
class PhaseConfig:
    epochs: int
    lr: float
    trainable: str  # "head", "all" or "last:N" (head plus the last N stages)


@dataclass(frozen=True)
class DistillConfig:
    teachers: tuple[str, ...]  # run folders of bank-trained teachers (same split, seed, views and augmentation)
    temperature: float = 2.0
    alpha: float = 0.7  # weight of the soft-target KL; 1 - alpha goes to the label loss
    hint: float = 0.0  # weight of the feature hint (`dermtrain.hints`) from the first teacher's bank; 0: none
    hint_at: int = 3  # the student's stages whose output is matched to the teacher's bank features


@dataclass(frozen=True)
class Recipe:
    """The fast path (`dermtrain.fastfit`): K augmented views drawn once, a one-cycle schedule, an EMA of the
    weights, a class-balanced loss, and a log-prior added back at inference (chosen on validation).

    freeze_at > 0: the first freeze_at stages are frozen and run once per view into a feature bank; only the
    late stages and the head train. freeze_at = 0: the whole network trains on the same views (distillation).
    The top-level `sampling` applies here too: class-balanced sampling also flattens the prior the loss adjusts for.
    """
    epochs: int = 15
    lr: float = 1e-3
    schedule: str = "onecycle"  # onecycle | cosine (both warm up for `warmup` of the steps)
    warmup: float = 0.1
    ema: float = 0.998  # 0: no EMA
    label_smoothing: float = 0.1
    loss: str = "logit_adjusted"  # logit_adjusted | ce | focal
    tau: float = 1.0  # logit adjustment strength
    views: int = 6
    freeze_at: int = 4
    bank_bf16: bool = True  # bfloat16 autocast for the bank where it is fast (`dermtrain.precision`); val: float32
    prior_grid: tuple[float, ...] = (0.0, 0.125, 0.25, 0.375, 0.5, 0.75, 1.0)
    dihedral: bool = False  # freeze_at 0 only: each step also flips / transposes its views at random
    mixup: float = 0.0  # Beta(alpha, alpha) mixup of each batch's inputs (bank features or views); 0: none
    cutmix: float = 0.0  # Beta(alpha, alpha) CutMix of each batch's inputs; with mixup too, either per batch; 0: none
    # Every BatchNorm keeps its running statistics (eval mode) while its scale and shift train: for fine-tuning a
    # trained network end to end, whose later stages learnt on features normalised by those statistics.
    bn_eval: bool = False
    holdout: tuple[int, int] | None = None  # (fold, folds): train without that lesion fold (`dermtrain.folds`)
    distill: DistillConfig | None = None
    # The run's own draws (initial weights, sampling order, each step's view, drop-path); None: the config's `seed`.
    # `seed` also fixes the views, which a student must share with its teachers: a second seed of one student
    # changes this one.
    train_seed: int | None = None


@dataclass(frozen=True)
class TrainConfig:
    model: str = "convnext_atto"
    img_size: int = 128
    resize: str = "squash"
    mean: tuple[float, float, float] | None = None  # None: the backbone's own (timm pretrained config)
    std: tuple[float, float, float] | None = None
    pretrained: bool = False
    init: str | None = None  # file, or pypi:efficientnet-lite0|1|2
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    phase1: PhaseConfig = PhaseConfig(25, 1e-3, "head")
    phase2: PhaseConfig = PhaseConfig(10, 1e-4, "last:3")
    batch_size: int = 64
    eval_batch_size: int = 128
    weight_decay: float = 1e-2
    focal_gamma: float = 2.0
    focal_alpha: float | tuple[float, ...] = 1.0
    sampling: str = "uniform"  # uniform | balanced | sqrt (class-balanced sampling, by inverse frequency^1 or ^0.5)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    plateau_factor: float = 0.5
    plateau_patience: int = 2
    amp: str = "auto"  # auto | bf16 | fp16 | off
    channels_last: bool = True
    seed: int = 0
    threads: int = 0  # 0: all cores
    limit: int | None = None  # at most this many images per split (smoke runs)
    recipe: Recipe | None = None  # set: `dermtrain fit` takes the fast path instead of the two phases

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def total_epochs(self) -> int:
        return self.phase1.epochs + self.phase2.epochs


def from_dict(d: dict) -> TrainConfig:
    known = {f.name for f in fields(TrainConfig)}
    unknown = set(d) - known - {"description"}
    if unknown:
        raise ConfigError(f"unknown config keys: {', '.join(sorted(unknown))}")
    d = {k: v for k, v in d.items() if k in known}
    for ph in ("phase1", "phase2"):
        if ph in d:
            d[ph] = PhaseConfig(**d[ph])
    if "augment" in d:
        d["augment"] = AugmentConfig(**d["augment"])
    if d.get("recipe") is not None:
        d["recipe"] = _recipe(d["recipe"])
    for k in ("mean", "std", "focal_alpha"):
        if isinstance(d.get(k), list):
            d[k] = tuple(d[k])
    cfg = TrainConfig(**d)
    validate(cfg)
    return cfg


def _recipe(d: dict) -> Recipe:
    d = dict(d)
    unknown = set(d) - {f.name for f in fields(Recipe)}
    if unknown:
        raise ConfigError(f"unknown recipe keys: {', '.join(sorted(unknown))}")
    if d.get("distill") is not None:
        dd = dict(d["distill"])
        dd["teachers"] = tuple(dd.get("teachers", ()))
        d["distill"] = DistillConfig(**dd)
    for k in ("prior_grid", "holdout"):
        if d.get(k) is not None:
            d[k] = tuple(d[k])
    return Recipe(**d)


def validate_recipe(r: Recipe) -> None:
    if r.schedule not in ("onecycle", "cosine"):
        raise ConfigError(f"recipe.schedule must be onecycle or cosine, not {r.schedule!r}")
    if r.loss not in ("logit_adjusted", "ce", "focal"):
        raise ConfigError(f"recipe.loss must be logit_adjusted, ce or focal, not {r.loss!r}")
    if r.epochs < 1 or r.views < 1 or r.freeze_at < 0 or not 0 <= r.ema < 1 or not 0 <= r.warmup < 1:
        raise ConfigError("recipe needs epochs >= 1, views >= 1, freeze_at >= 0, 0 <= ema < 1, 0 <= warmup < 1")
    if r.dihedral and r.freeze_at:
        raise ConfigError("recipe.dihedral is for end-to-end students (freeze_at 0): a bank holds fixed views")
    if r.holdout is not None and not valid_holdout(r.holdout):
        raise ConfigError(f"recipe.holdout must be [fold, folds] with folds >= 2 and 0 <= fold < folds, not {r.holdout}")
    if r.distill is not None and not r.distill.teachers:
        raise ConfigError("recipe.distill needs at least one teacher run folder")
    if r.distill is not None and (r.distill.hint < 0 or r.distill.hint_at < 1):
        raise ConfigError("recipe.distill needs hint >= 0 and hint_at >= 1")
    for name in ("mixup", "cutmix"):
        alpha = getattr(r, name)
        if not alpha >= 0:
            raise ConfigError(f"recipe.{name} is a Beta distribution's alpha: 0 (off) or more, not {alpha}")
        if alpha and r.distill is not None and r.distill.hint:
            raise ConfigError(f"recipe.{name} and recipe.distill.hint do not combine: a mixed input has no teacher "
                              "features")
    if r.distill is not None and r.distill.hint and r.freeze_at:
        raise ConfigError("recipe.distill.hint is for end-to-end students (freeze_at 0): a bank's stages are frozen")


def validate(cfg: TrainConfig) -> None:
    if cfg.recipe is not None:
        validate_recipe(cfg.recipe)
    if cfg.sampling not in ("uniform", "balanced", "sqrt"):
        raise ConfigError(f"sampling must be uniform, balanced or sqrt, not {cfg.sampling!r}")
    if cfg.amp not in ("auto", "bf16", "fp16", "off"):
        raise ConfigError(f"amp must be auto, bf16, fp16 or off, not {cfg.amp!r}")
    if isinstance(cfg.focal_alpha, tuple) and len(cfg.focal_alpha) != 7:
        raise ConfigError("focal_alpha must be one number or 7 (one per class)")
    if cfg.phase1.epochs < 0 or cfg.phase2.epochs < 0 or cfg.total_epochs == 0:
        raise ConfigError("the two phases need a non-negative number of epochs, at least one in all")
    if not 0 <= cfg.augment.sharpness <= 1:
        raise ConfigError(f"augment.sharpness must be in [0, 1] (factors 1 - s to 1 + s), not {cfg.augment.sharpness}")
    if cfg.augment.jpeg and not 1 <= cfg.augment.jpeg <= 99:
        raise ConfigError(f"augment.jpeg is the lowest JPEG quality, in [1, 99] (0: off), not {cfg.augment.jpeg}")


def presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def load_config(name_or_path: str) -> TrainConfig:
    path = Path(name_or_path)
    if not path.suffix and (PRESET_DIR / f"{name_or_path}.json").is_file():
        path = PRESET_DIR / f"{name_or_path}.json"
    if not path.is_file():
        raise ConfigError(f"{name_or_path}: no such config file or preset (presets: {', '.join(presets())})")
    try:
        return from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError) as e:
        raise ConfigError(f"{path}: {e}") from None


def with_overrides(cfg: TrainConfig, **kw) -> TrainConfig:
    """Command-line overrides; None leaves the config's value."""
    kw = {k: v for k, v in kw.items() if v is not None}
    if "epochs_head" in kw:
        kw["phase1"] = replace(cfg.phase1, epochs=kw.pop("epochs_head"))
    if "epochs_tune" in kw:
        kw["phase2"] = replace(cfg.phase2, epochs=kw.pop("epochs_tune"))
    recipe_kw = {k: kw.pop(k) for k in ("epochs", "views", "freeze_at", "holdout", "teachers", "train_seed")
                 if k in kw}
    if recipe_kw:
        if cfg.recipe is None:
            flags = ", ".join("--" + k.replace("_", "-") for k in recipe_kw)
            raise ConfigError(f"{flags}: only for a config with a recipe (e.g. lite0-bank)")
        teachers = recipe_kw.pop("teachers", None)
        r = replace(cfg.recipe, **recipe_kw)
        if teachers is not None:
            r = replace(r, distill=replace(r.distill or DistillConfig(teachers=()), teachers=teachers))
        kw["recipe"] = r
    cfg = replace(cfg, **kw)
    validate(cfg)
    return cfg
