"""The teachers' ensemble, scored from the logits `dermtrain eval` saved: each run's log-probabilities at its own
temperature, averaged; the ensemble's temperature fitted on validation. Each row's melanoma flag is chosen on
validation as the product chooses it (`dermtrain.metrics.choose_flag`: its own share of the training log-prior,
the threshold for >= 90% sensitivity), so the flag figures compare with the shipped models'. With test-time views
(`--tta flip`) the temperature and the flag's shift stay those chosen on the plain logits, and only the threshold is
chosen again on the views' validation logits, as `dermtrain eval --tta` does.

    python bench/ensemble.py runs/lite0-bank runs/lite1-bank --data $DERM_DATA [--tta flip] [--out ensemble.md]

A member may also be a shipped ONNX bundle whose run folder is not on this machine: its logits on the validation
and test images of --split are computed with ONNX Runtime (the bundle's own preprocessing and temperature).

    python bench/ensemble.py engines/models/efficientnet_lite0.onnx runs/lite1-bank --data $DERM_DATA
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

from dermconvert.ensemble import log_probs
from dermtrain.data import DataError
from dermtrain.fit import split_log_prior
from dermtrain.metrics import FlagChoice, choose_flag, fit_temperature, flag_threshold, summarize
from engines.bundle import BundleError
from engines.labels import CLASS_CODES


def load(run: Path, tta: str) -> tuple[dict, float]:
    tag = "" if tta == "none" else f"_{tta}"
    d = np.load(run / f"logits_test{tag}.npz")
    return d, float(json.loads((run / "calibration.json").read_text())["temperature"])


def load_onnx(onnx_path: Path, split: Path, data: Path, tta: str) -> tuple[dict, float]:
    """What `load` reads from a run folder (validation and test logits and labels), from an ONNX bundle."""
    from dermtrain.cache import build_cache
    from dermtrain.data import load_records
    from dermtrain.splits import read_manifest, select
    from engines.onnx_backend import OrtEngine
    from engines.preprocess import normalize
    eng = OrtEngine(onnx_path, "cpu")
    spec, rows, records = eng.bundle.preprocess, read_manifest(split), load_records(data)
    out = {}
    for prefix, split_name in (("", "test"), ("val_", "val")):
        x, y = build_cache(select(rows, records, split_name), spec, f"{onnx_path.name}: {split_name}")
        out[f"{prefix}logits"] = np.concatenate([eng.logits(normalize(x[i:i + 64], spec), tta)[0]
                                                 for i in range(0, len(x), 64)])
        out[f"{prefix}labels"] = y
    return out, eng.bundle.temperature


def training_prior(runs: list[Path], data: Path, split: Path) -> np.ndarray:
    """The log-prior of the training images the members' flags shift towards: those a run folder's config selected
    (its limit and seed, as `dermtrain eval` takes them), or all of the split's for ONNX bundles alone."""
    run = next((r for r in runs if r.suffix != ".onnx"), None)
    cfg = json.loads((run / "config.json").read_text()) if run is not None else {}
    return split_log_prior(data, split, cfg.get("limit"), cfg.get("seed", 0))


def member_name(path: Path) -> str:
    return path.stem if path.suffix == ".onnx" else path.name


def row(name: str, s: dict, shift: float) -> str:
    rec = " / ".join(f"{100 * s['per_class'][c]:.1f}" for c in CLASS_CODES)
    t = s["melanoma"]["threshold"]
    return (f"| {name} | {100 * s['accuracy']:.1f}% | {100 * s['balanced_accuracy']:.1f}% | {rec} | "
            f"{100 * t['recall']:.1f}% / {100 * t['specificity']:.1f}% (shift {shift:g}) |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="run folders (after `dermtrain eval`) or ONNX bundles")
    ap.add_argument("--tta", default="none", choices=("none", "flip"))
    ap.add_argument("--split", type=Path, default=Path("splits/ham10000_seed0.csv"),
                    help="the runs' split manifest (its training prior; ONNX members' images)")
    ap.add_argument("--data", type=Path, default=os.environ.get("DERM_DATA"),
                    help="the dataset folder (default $DERM_DATA): the training prior, ONNX members' images")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    if a.data is None:
        print("ensemble: error: the melanoma flag needs the training prior: --data or $DERM_DATA", file=sys.stderr)
        return 2
    try:
        log_prior = training_prior(a.runs, a.data, a.split)
    except (DataError, OSError, ValueError) as e:
        print(f"ensemble: error: {e}", file=sys.stderr)
        return 2
    views = ("none",) if a.tta == "none" else ("none", a.tta)
    loaded = {tta: [] for tta in views}
    for r, tta in ((r, tta) for r in a.runs for tta in views):
        try:
            loaded[tta].append(load_onnx(r, a.split, a.data, tta) if r.suffix == ".onnx" else load(r, tta))
        except (BundleError, DataError) as e:  # their messages name the file already
            print(f"ensemble: error: {e}", file=sys.stderr)
            return 2
        except OSError as e:
            hint = ("" if r.suffix == ".onnx" else f" (a run folder needs `dermtrain eval RUN --split-name test"
                                                   f"{'' if tta == 'none' else ' --tta ' + tta}` first)")
            print(f"ensemble: error: {e.filename or r}: {e.strerror or e}{hint}", file=sys.stderr)
            return 2
        except (KeyError, ValueError) as e:
            print(f"ensemble: error: {r}: unreadable logits or calibration ({e})", file=sys.stderr)
            return 2
    labels, val_labels = loaded["none"][0][0]["labels"], loaded["none"][0][0]["val_labels"]
    for r, (d, _) in ((r, m) for tta in views for r, m in zip(a.runs, loaded[tta])):
        if not (np.array_equal(d["labels"], labels) and np.array_equal(d["val_labels"], val_labels)):
            print(f"ensemble: error: {r} was evaluated on other images (split or limit differ)", file=sys.stderr)
            return 2
    lines = ["| model | accuracy | balanced acc | recall akiec / bcc / bkl / df / mel / nv / vasc | "
             "melanoma recall / specificity at the flag (its shift) |", "|---|---|---|---|---|"]
    plain = [(d["val_logits"], t) for d, t in loaded["none"]]
    viewed = [(d["val_logits"], d["logits"]) for d, _ in loaded[a.tta]]
    members = [(member_name(r), pv, vv, vt, t) for r, (pv, t), (vv, vt) in zip(a.runs, plain, viewed)]
    members.append(("ensemble of " + " + ".join(member_name(r) for r in a.runs),
                    *(np.mean([log_probs(m[k], m[4]) for m in members], axis=0) for k in (1, 2, 3)), None))
    for name, plain_val, val, test, t in members:
        temperature = fit_temperature(plain_val, val_labels) if t is None else t
        flag = choose_flag(plain_val, val_labels, temperature, log_prior)
        if a.tta != "none":
            flag = FlagChoice(flag.shift, flag.offsets, flag_threshold(val, val_labels, temperature, flag.offsets), ())
        sv, st = (summarize(x, y, temperature, flag.threshold, flag.offsets)
                  for x, y in ((val, val_labels), (test, labels)))
        lines.append(row(f"{name}: validation", sv, flag.shift))
        lines.append(row(f"{name}: **test**", st, flag.shift))
    text = (f"Test-time views: {a.tta}. Temperatures and melanoma flags (the share of the training log-prior and "
            f"the threshold for >= 90% sensitivity) chosen on validation.\n\n" + "\n".join(lines) + "\n")
    print(text)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
