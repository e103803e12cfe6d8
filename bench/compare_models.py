"""Comparison table of trained models on the test split, from their run folders and ONNX bundles.

    python bench/compare_models.py NAME=RUN_DIR:MODEL.onnx [...] --out docs/models/comparison.md [--scan DIR]

Reads RUN_DIR/metrics.json (and metrics_flip.json where present, from `dermtrain eval --tta flip`), times the
ONNX bundle at batch 1 on ONNX Runtime with 2 threads, adds the training time from the run's history, with --scan
the share of all images of DIR the bundle flags as melanoma suspects, and prints / writes the markdown table.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from engines.labels import CLASS_CODES
from latency import latency_ms  # bench/latency.py, beside this script


def pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def training_minutes(run: Path) -> float | None:
    """Wall time of the run: its epochs plus the feature bank build (fast path); a soup's is its runs'."""
    from dermtrain.soup import training_time
    info = run / "run.json"
    soup = json.loads(info.read_text()).get("soup") if info.is_file() else None
    if soup:
        return sum(i["minutes"] for i in soup)
    return training_time(run)["minutes"] if (run / "history.json").is_file() else None


def flagged_share(onnx_path: Path, folder: Path, tta: str) -> float:
    """Share of every image in the folder that the bundle flags (what a full archive scan would flag)."""
    from engines.imageio import load_rgb
    from engines.onnx_backend import OrtEngine
    from engines.preprocess import preprocess
    from engines.scan.discover import find_images
    eng = OrtEngine(onnx_path, "cpu")
    files = find_images(folder).files
    flags = 0
    for i in range(0, len(files), 64):
        x = np.stack([preprocess(load_rgb(f), eng.bundle.preprocess) for f in files[i:i + 64]])
        p, _ = eng.infer(x, tta)
        flags += int(eng.bundle.mel_flags(p, tta).sum())
    return flags / len(files)


def row(name: str, m: dict, onnx_path: Path, lat: float, minutes: float | None, flagged: float | None) -> str:
    from engines.display import pct as pct2
    mel_t = m["melanoma"]["threshold"]
    recalls = " | ".join(pct(m["per_class"][c]) for c in CLASS_CODES)
    return (f"| {name} | {m['model']} @ {m['img_size']} | {m['tta']} | {pct(m['accuracy'])} | {pct(m['balanced_accuracy'])} | "
            f"{recalls} | {pct(mel_t['recall'])} / {pct(mel_t['specificity'])} (t={pct2(mel_t['threshold'])}) | "
            f"{pct(flagged)} | {lat:.1f} ms | {'n/a' if minutes is None else f'{minutes:.0f} min'} | "
            f"{pct(m['calibration']['ece_after'])} | {onnx_path.stat().st_size / 1e6:.1f} MB |")


def class_table(name: str, m: dict) -> list[str]:
    from engines.labels import class_name
    lines = [f"### {name}: per class (test split, n={m['n']})", "",
             "| Class | Correct / Total | Accuracy | Most Common Confusion |", "|---|---|---|---|"]
    for r in m["class_table"]:
        conf = (f"{class_name(r['confused_with'])} ({r['confused_count']}, {pct(r['confused_share'])})"
                if r["confused_with"] else "none")
        lines.append(f"| {r['name']} | {r['correct']} / {r['total']} | {pct(r['accuracy'])} | {conf} |")
    return lines + [""]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", help="NAME=RUN_DIR:MODEL.onnx")
    ap.add_argument("--out")
    ap.add_argument("--scan", help="folder of images: report the share each model flags over all of them")
    a = ap.parse_args()
    head = ["| model | architecture | test-time views | accuracy | balanced accuracy | "
            + " | ".join(f"recall {c}" for c in CLASS_CODES)
            + " | melanoma recall / specificity at the threshold | share of the full scan flagged | "
            "CPU latency, batch 1, 2 threads | training time (2 cores) | ECE after temperature | ONNX size |",
            "|" + "---|" * (11 + len(CLASS_CODES))]
    rows, tables, data = [], [], {}
    for spec in a.models:
        name, rest = spec.split("=", 1)
        run, onnx_path = rest.split(":", 1)
        lat = latency_ms(Path(onnx_path))
        minutes = training_minutes(Path(run))
        for fname in ("metrics.json", "metrics_flip.json"):
            f = Path(run) / fname
            if f.is_file():
                m = json.loads(f.read_text())
                # the archive scan is single-view (what dermscan runs by default); flips would cost 4x for a column
                flagged = flagged_share(Path(onnx_path), Path(a.scan), "none") if a.scan and m["tta"] == "none" else None
                lat_tta = lat * (4 if m["tta"] == "flip" else 1)
                rows.append(row(name, m, Path(onnx_path), lat_tta, minutes, flagged))
                data[f"{name}:{m['tta']}"] = {"accuracy": m["accuracy"], "balanced_accuracy": m["balanced_accuracy"],
                                              "per_class": m["per_class"], "melanoma": m["melanoma"],
                                              "latency_ms": lat_tta, "training_minutes": minutes,
                                              "flagged_share": flagged}
        tables += class_table(name, json.loads((Path(run) / "metrics.json").read_text()))
    text = "\n".join(head + rows + [""] + tables)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")
        Path(a.out).with_suffix(".json").write_text(json.dumps(data, indent=2) + "\n")


if __name__ == "__main__":
    main()
