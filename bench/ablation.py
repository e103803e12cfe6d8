"""Recipe ablation on the validation split only: short runs of the Lite0 fast path on its cached 6-view feature
bank, one change at a time, then docs/ablation.md. Each run resumes if stopped; finished runs are not redone.

    python bench/ablation.py --data $DERM_DATA [--epochs 15] [--only base,focal,...]   -> docs/ablation_runs.md
    python bench/ablation.py --views 12 --epochs 9 --base runs/lite0-v12-e9 --out runs/ablation-v12 \
        --doc docs/ablation_runs_v12.md --only no_ema,no_smoothing     # on the cached 12-view bank

The test split is never read. The freeze_* and views_* variants change the bank, so each builds (and caches) its own
first; resolution also changes the bank: not in this table yet. `--base RUN` takes a finished run of the very same
config as the base row instead of training it again (training here is deterministic: one config, one history).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# name -> (what changes, recipe overrides); "base" is the shipped lite0-bank recipe
VARIANTS = {
    "base": ("shipped recipe: logit-adjusted CE (tau 1), label smoothing 0.1, EMA 0.998, one-cycle 1e-3", {}),
    "focal": ("focal loss (gamma 2) instead of the logit-adjusted CE", {"loss": "focal"}),
    "no_ema": ("no EMA of the weights", {"ema": 0.0}),
    "plain_ce": ("plain CE (no logit adjustment); the prior shift may then be negative",
                 {"loss": "ce", "prior_grid": (-1.0, -0.75, -0.5, -0.25, 0.0, 0.25)}),
    "no_smoothing": ("no label smoothing", {"label_smoothing": 0.0}),
    "cosine": ("cosine schedule with linear warm-up instead of one-cycle", {"schedule": "cosine"}),
    "lr_3e-3": ("peak learning rate 3e-3", {"lr": 3e-3}),
    "freeze_3": ("blocks 0-2 frozen, block 3 trains too (bank at stride 8: 40 x 24 x 24)", {"freeze_at": 3}),
    "freeze_2": ("blocks 0-1 frozen, blocks 2-3 train too (bank at stride 4: 24 x 48 x 48)", {"freeze_at": 2}),
    "views_12": ("12 augmented views per training image instead of 6 (a 1.9 GB bank)", {"views": 12}),
}


def config_for(name: str, epochs: int, views: int | None = None):
    from dermtrain.config import load_config
    cfg = load_config("lite0-bank")
    r = replace(cfg.recipe, epochs=epochs, **({"views": views} if views else {}))
    return replace(cfg, recipe=replace(r, **VARIANTS[name][1]))


def adopt_base(base: Path, epochs: int, views: int | None, out: Path) -> None:
    """Link a finished run as the base row, if its config is the base config (the description aside)."""
    from dermtrain.config import from_dict
    saved = json.loads((base / "config.json").read_text())
    if from_dict(saved).to_dict() != config_for("base", epochs, views).to_dict():
        raise SystemExit(f"error: {base}: its config.json is not the base config for --epochs {epochs}"
                         + (f" --views {views}" if views else ""))
    if len(json.loads((base / "history.json").read_text())) < epochs:
        raise SystemExit(f"error: {base}: has not finished its {epochs} epochs")
    link = out / "base"
    if not link.exists():
        link.symlink_to(base.resolve(), target_is_directory=True)


def run(name: str, epochs: int, views: int | None, data: str, split: str, out: Path) -> None:
    from engines.fsutil import write_json
    run_dir = out / name
    hist = run_dir / "history.json"
    if hist.is_file() and len(json.loads(hist.read_text())) >= epochs:
        return
    cfg_file = out / f"{name}.json"
    write_json(cfg_file, config_for(name, epochs, views).to_dict())
    cmd = [str(ROOT / ".venv/bin/dermtrain"), "fit", "--config", str(cfg_file), "--data", data, "--split", split,
           "--out", str(run_dir), "--quiet"] + (["--resume"] if (run_dir / "last.pt").is_file() else [])
    subprocess.run(cmd, check=True)


def table(out: Path, epochs: int, views: int | None, command: str) -> str:
    lines = [f"# Recipe ablation (validation split only, {epochs} epochs each on the cached Lite0 bank)", "",
             f"EfficientNet-Lite0 @192, blocks 0-3 frozen into the {views or 6}-view feature bank (freeze_*: fewer), the "
             "rest trained; the best epoch by validation balanced accuracy, with its chosen prior shift. Command: "
             f"`{command}`. The test split is never read.", "",
             "| variant | what changes | val balanced accuracy | val accuracy | val melanoma recall (argmax) | prior shift | epoch |",
             "|---|---|---|---|---|---|---|"]
    for name, (what, _) in VARIANTS.items():
        f = out / name / "history.json"
        if not f.is_file():
            lines.append(f"| {name} | {what} | not run | | | | |")
            continue
        hist = json.loads(f.read_text())
        b = max(hist, key=lambda h: h["val_balanced_acc"])
        lines.append(f"| {name} | {what} | {100 * b['val_balanced_acc']:.1f}% | {100 * b['val_acc']:.1f}% | "
                     f"{100 * b['val_mel_recall']:.1f}% | {b['prior_shift']:g} | {b['epoch']} of {len(hist)} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/data/ham10000")
    ap.add_argument("--split", default=str(ROOT / "splits/ham10000_seed0.csv"))
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--views", type=int, help="views per training image for every variant (default: the preset's 6)")
    ap.add_argument("--base", type=Path, help="a finished run of the base config to use as the base row")
    ap.add_argument("--only", help="comma-separated variant names, in this order")
    ap.add_argument("--out", default=str(ROOT / "runs/ablation"))
    ap.add_argument("--doc", default=str(ROOT / "docs/ablation_runs.md"))
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    names = a.only.split(",") if a.only else list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"error: --only: unknown variants {', '.join(unknown)} (known: {', '.join(VARIANTS)})")
    if a.base:
        adopt_base(a.base, a.epochs, a.views, out)
    command = "python bench/ablation.py " + " ".join(sys.argv[1:])
    for name in names:
        run(name, a.epochs, a.views, a.data, a.split, out)
        Path(a.doc).write_text(table(out, a.epochs, a.views, command))
    print(Path(a.doc).read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
