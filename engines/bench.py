"""`dermbench FOLDER`: on the same real images and model, pure inference images/s, dermscan end-to-end
images/s, and a naive PyTorch eager loop over the same timm model. Ends with one JSON line."""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def images_per_second(engine, batch: np.ndarray, seconds: float = 3.0) -> float:
    """Throughput of `engine.run` on one preprocessed batch, repeated for `seconds` after a warm-up call."""
    engine.run(batch)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        engine.run(batch)
        n += len(batch)
    return n / (time.perf_counter() - t0)


def pure_inference(engine, batch: np.ndarray, bs: int) -> float:
    engine.infer(batch[:bs])  # warm-up: ORT allocates and plans on the first run
    t0 = time.perf_counter()
    for i in range(0, len(batch), bs):
        engine.infer(batch[i:i + bs])
    return len(batch) / (time.perf_counter() - t0)


def scan_end_to_end(files: list[Path], folder: Path, engine, bs: int, ray: str | None = None,
                    model_path: Path | None = None) -> float:
    """dermscan's own path (decode, preprocess, infer, CSV) over the files; with `ray`, the Ray path (its start-up
    excluded: a warm-up scan of one batch starts the instance and the actors' first load first)."""
    from engines.scan.results import ResultsWriter, ScanIdentity
    from engines.scan.scanner import scan

    identity = ScanIdentity(model_sha256="", model=engine.bundle.model_name, folder=str(folder.resolve()),
                            recursive=False, tta="none", mel_threshold=engine.bundle.mel_threshold)
    with tempfile.TemporaryDirectory() as d:
        def run(subset: list[Path], name: str) -> float:
            w = ResultsWriter(Path(d) / name, identity, resume=False)
            t0 = time.perf_counter()
            if ray is None:
                scan(subset, folder, engine, w, bs, progress=False)
            else:
                from engines.scan.ray_scan import scan_ray
                scan_ray(subset, folder, model_path, engine.bundle.preprocess, w, bs, address=ray, progress=False)
            dt = time.perf_counter() - t0
            w.close()
            return dt
        if ray is not None:
            run(files[:bs], "warm.csv")
        return len(files) / run(files, "r.csv")


def torch_eager(files: list[Path], model_name: str, size: int, threads: int) -> float | str:
    """What a research script does: per image, PIL decode, torchvision transforms, model(x[None]) in fp32."""
    try:
        import timm
        import torch
        from PIL import Image
        from torchvision import transforms as T
    except ImportError as e:
        return f"PyTorch not installed ({e.name})"
    if threads:
        torch.set_num_threads(threads)
    model = timm.create_model(model_name, num_classes=7).eval()
    tf = T.Compose([T.Resize((size, size)), T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    with torch.no_grad():
        model(torch.zeros(1, 3, size, size))
        t0 = time.perf_counter()
        for f in files:
            x = tf(Image.open(f).convert("RGB"))
            model(x[None]).softmax(1)
    return len(files) / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    from engines.bundle import BundleError
    from engines.imageio import load_rgb
    from engines.preprocess import preprocess_batch
    from engines.scan.discover import find_images
    from engines.select import PRECISIONS, open_engine

    ap = argparse.ArgumentParser(prog="dermbench", description=__doc__)
    ap.add_argument("folder")
    ap.add_argument("--limit", type=int, default=512)
    ap.add_argument("--model", help="ONNX bundle or shipped name (default: the shipped default)")
    ap.add_argument("--backend", default="cpu")
    ap.add_argument("--precision", choices=PRECISIONS, help="run the gated file of this precision beside the model "
                    "(M.fp16.onnx, M.int8.onnx; default: the file as given)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch eager baseline")
    ap.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                    help="also time dermscan --ray (a local instance, or ADDRESS) against the plain scan")
    a = ap.parse_args(argv)
    folder = Path(a.folder)
    if not folder.is_dir():
        print(f"dermbench: error: {folder}: folder not found", file=sys.stderr)
        return 2
    try:
        engine = open_engine(a.model, a.backend, a.threads, a.batch, a.precision).engine
    except BundleError as e:
        print(f"dermbench: error: {e}", file=sys.stderr)
        return 2
    files = find_images(folder).files[:a.limit]
    spec = engine.bundle.preprocess
    print(f"dermbench: {len(files)} images of {folder}, {engine.describe()}, batch {a.batch}, {os.cpu_count()} cores")
    batch = preprocess_batch([load_rgb(f) for f in files], spec)
    pure = pure_inference(engine, batch, a.batch)
    print(f"pure inference (preprocessed, in memory): {pure:.1f} images/s")
    e2e = scan_end_to_end(files, folder, engine, a.batch)
    print(f"dermscan end to end (decode, preprocess, infer, CSV): {e2e:.1f} images/s ({100 * e2e / pure:.0f}% of pure)")
    ray_e2e = None
    if a.ray:
        from engines.select import resolve_model, with_precision
        from engines.scan.results import OutputError
        try:
            ray_e2e = scan_end_to_end(files, folder, engine, a.batch, a.ray,
                                      with_precision(resolve_model(a.model), a.precision))
        except OutputError as e:
            print(f"dermbench: error: {e}", file=sys.stderr)
            return 2
        print(f"dermscan --ray end to end ({a.ray}): {ray_e2e:.1f} images/s ({ray_e2e / e2e:.2f}x the plain scan)")
    eager = "skipped" if a.no_torch else torch_eager(files[:min(len(files), 256)], engine.bundle.model_name, spec.size,
                                                      a.threads)
    if isinstance(eager, float):
        print(f"naive PyTorch eager loop (batch 1, fp32): {eager:.1f} images/s (dermscan is {e2e / eager:.1f}x)")
    else:
        print(f"naive PyTorch eager loop: {eager}")
    print(json.dumps({"model": engine.bundle.model_name, "input_size": spec.size, "backend": engine.backend,
                      "images": len(files), "batch": a.batch, "pure_images_per_s": round(pure, 2),
                      "scan_images_per_s": round(e2e, 2),
                      "torch_eager_images_per_s": round(eager, 2) if isinstance(eager, float) else None,
                      "scan_over_pure": round(e2e / pure, 3),
                      "ray_scan_images_per_s": round(ray_e2e, 2) if ray_e2e else None,
                      "ray_over_plain": round(ray_e2e / e2e, 3) if ray_e2e else None,
                      "scan_over_torch_eager": round(e2e / eager, 2) if isinstance(eager, float) else None}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
