"""The GPU check: every shipped model at every gated precision on ONNX Runtime's CUDA provider and on TensorRT,
against ONNX Runtime CPU FP32 on the same validation images: top-1 agreement, largest probability difference,
images/s at batch 1 and 32. Run by bench/gpu_check.sh on an NVIDIA machine; prints one table, writes JSON.

    python bench/gpu_check.py IMAGES_DIR [--out results.json] [--limit 512]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from engines.bench import images_per_second
from engines.errors import one_line
from engines.imageio import load_rgb
from engines.onnx_backend import OrtEngine, available_providers
from engines.preprocess import preprocess_batch
from engines.scan.discover import find_images
from engines.select import PRECISIONS, shipped_models, with_precision


def throughput(engine, x: np.ndarray, batch: int) -> float:
    return images_per_second(engine, np.ascontiguousarray(np.resize(x, (batch, *x.shape[1:]))))


def candidates(path: Path):
    """(label, engine factory) for each backend that can run `path` here."""
    if "CUDAExecutionProvider" in available_providers():
        yield "onnxruntime-cuda", lambda mb: OrtEngine(path, "cuda", max_batch=mb)
    from engines.tensorrt_backend import TrtEngine, trt_unavailable
    if trt_unavailable() is None:
        yield "tensorrt", lambda mb: TrtEngine(path, max_batch=mb)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("images", type=Path)
    ap.add_argument("--limit", type=int, default=512)
    ap.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    a = ap.parse_args(argv)
    files = find_images(a.images).files[:a.limit]
    rgb = [load_rgb(f) for f in files]
    print(f"gpu_check: {len(files)} images of {a.images}; ONNX Runtime providers: {', '.join(available_providers())}")
    rows = []
    for name, fp32 in shipped_models().items():
        ref = OrtEngine(fp32, "cpu")
        x = preprocess_batch(rgb, ref.bundle.preprocess)
        p_ref, _ = ref.infer(x)
        for precision in PRECISIONS:
            try:
                path = with_precision(fp32, precision)
            except Exception as e:  # noqa: BLE001 - no gated file of this precision: say so and go on
                rows.append({"model": name, "precision": precision, "backend": "-", "error": str(e)})
                continue
            for backend, make in candidates(path):
                row = {"model": name, "precision": precision, "backend": backend}
                try:
                    eng = make(32)
                    p, _ = eng.infer(x)
                    row.update(top1_agreement=round(float((p.argmax(1) == p_ref.argmax(1)).mean()), 4),
                               max_prob_diff=round(float(np.abs(p - p_ref).max()), 4),
                               images_per_s_b32=round(throughput(eng, x, 32), 1))
                    row["images_per_s_b1"] = round(throughput(make(1), x, 1), 1)
                except Exception as e:  # noqa: BLE001 - one failing backend must not hide the others
                    row["error"] = one_line(e)
                rows.append(row)
                print(json.dumps(row))
    print("\n| model | precision | backend | top-1 agreement vs CPU FP32 | max prob diff | images/s b1 | images/s b32 |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['model']} | {r['precision']} | {r['backend']} | {r['error']} | | | |")
        else:
            print(f"| {r['model']} | {r['precision']} | {r['backend']} | {r['top1_agreement']:.2%} | "
                  f"{r['max_prob_diff']:.4f} | {r['images_per_s_b1']} | {r['images_per_s_b32']} |")
    a.out.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
