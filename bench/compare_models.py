"""Comparison table of trained models on the test split, from their run folders and ONNX bundles.

    python bench/compare_models.py NAME=RUN_DIR:MODEL.onnx [...] --out docs/models/comparison.md

Reads RUN_DIR/metrics.json (and metrics_tta.json where present, from `dermtrain eval --tta flip`), times the
ONNX bundle at batch 1 on ONNX Runtime with 2 threads, and prints / writes the markdown table.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def latency_ms(onnx_path: Path, runs: int = 100) -> float:
    from engines.onnx_backend import OrtEngine
    eng = OrtEngine(onnx_path, "cpu", threads=2, max_batch=1)
    s = eng.bundle.preprocess.size
    x = np.random.default_rng(0).normal(size=(1, 3, s, s)).astype(np.float32)
    for _ in range(10):
        eng.run(x)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        eng.run(x)
        times.append((time.perf_counter() - t0) * 1000)
    return float(np.median(times))


def pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def row(name: str, m: dict, onnx_path: Path, lat: float) -> str:
    mel_a, mel_t = m["melanoma"]["argmax"], m["melanoma"]["threshold"]
    return (f"| {name} | {m['model']} @ {m['img_size']} | {m['tta']} | {pct(m['accuracy'])} | {pct(m['balanced_accuracy'])} | "
            f"{pct(m['macro_f1'])} | {pct(mel_a['recall'])} / {pct(mel_a['specificity'])} | "
            f"{pct(mel_t['recall'])} / {pct(mel_t['specificity'])} (t={mel_t['threshold']:.3f}) | "
            f"{pct(m['calibration']['ece_after'])} | {lat:.1f} ms | {onnx_path.stat().st_size / 1e6:.1f} MB |")


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
    a = ap.parse_args()
    head = ["| model | architecture | test-time views | accuracy | balanced accuracy | macro F1 | "
            "melanoma recall / specificity (argmax) | melanoma recall / specificity (operating threshold) | "
            "ECE after temperature | CPU latency, batch 1, 2 threads | ONNX size |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    rows, tables, data = [], [], {}
    for spec in a.models:
        name, rest = spec.split("=", 1)
        run, onnx_path = rest.split(":", 1)
        lat = latency_ms(Path(onnx_path))
        for fname in ("metrics.json", "metrics_flip.json"):
            f = Path(run) / fname
            if f.is_file():
                m = json.loads(f.read_text())
                rows.append(row(name, m, Path(onnx_path), lat * (4 if m["tta"] == "flip" else 1)))
                data[f"{name}:{m['tta']}"] = {"accuracy": m["accuracy"], "balanced_accuracy": m["balanced_accuracy"],
                                              "melanoma": m["melanoma"], "latency_ms": lat}
        tables += class_table(name, json.loads((Path(run) / "metrics.json").read_text()))
    text = "\n".join(head + rows + [""] + tables)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")
        Path(a.out).with_suffix(".json").write_text(json.dumps(data, indent=2) + "\n")


if __name__ == "__main__":
    main()
