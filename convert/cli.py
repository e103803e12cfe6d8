"""`dermconvert RUN_OR_CHECKPOINT --onnx OUT.onnx [--fp16] [--engine PATH] [--data DIR]` and
`dermconvert verify MODEL.onnx --data DIR --split split.csv`."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", help="HAM10000 folder for parity and the accuracy gate; default $DERM_DATA")
    p.add_argument("--split", help="split manifest (default: the run's split.csv)")
    p.add_argument("--limit", type=int, help="gate on a stratified subset of N validation images (smoke runs)")


def convert_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dermconvert", description="Checkpoint -> ONNX bundle -> FP16 ONNX / TensorRT, "
                                "each verified on real validation images. `dermconvert verify -h` for the gate alone.")
    p.add_argument("source", help="run folder (uses best.pt) or checkpoint file")
    p.add_argument("--onnx", required=True, help="output ONNX bundle")
    p.add_argument("--fp16", action="store_true", help="also OUT.fp16.onnx and, where TensorRT is present, an FP16 engine")
    p.add_argument("--engine", help="TensorRT engine path (default: the per-GPU cache); an error if TensorRT is missing")
    p.add_argument("--no-cam", action="store_true", help="no class-activation-map output")
    p.add_argument("--opt-batch", type=int, nargs="+", default=[1, 32], help="TensorRT profiles' optimal batches")
    p.add_argument("--max-batch", type=int, default=64)
    _common(p)
    return p


def verify_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dermconvert verify", description="FP16 ONNX / TensorRT engine vs the FP32 ONNX")
    p.add_argument("model", help="the FP32 ONNX bundle")
    p.add_argument("--fp16-onnx", help="default: MODEL with .fp16.onnx")
    p.add_argument("--engine", help="a TensorRT engine built from MODEL")
    _common(p)
    return p


def main(argv: list[str] | None = None) -> int:
    import os

    from dermconvert.export import ConvertError
    from dermtrain.data import DataError, resolve_data_dir
    from dermtrain.evaluate import EvalError
    from engines.bundle import BundleError

    argv = sys.argv[1:] if argv is None else argv
    is_verify = bool(argv) and argv[0] == "verify"
    a = (verify_parser() if is_verify else convert_parser()).parse_args(argv[1:] if is_verify else argv)
    try:
        data = resolve_data_dir(a.data) if (a.data or os.environ.get("DERM_DATA")) else None
        if is_verify:
            from dermconvert.pipeline import verify
            if data is None or not a.split:
                raise ConvertError("verify needs --data (or DERM_DATA) and --split")
            results = verify(Path(a.model), data, Path(a.split), Path(a.fp16_onnx) if a.fp16_onnx else None,
                             Path(a.engine) if a.engine else None, a.limit)
            return 0 if all(r.passed for r in results) else 1
        from dermconvert.pipeline import convert
        res = convert(Path(a.source), Path(a.onnx), a.fp16, Path(a.engine) if a.engine else None, data,
                      Path(a.split) if a.split else None, not a.no_cam, a.limit, tuple(a.opt_batch), a.max_batch)
        if not res.passed:
            print(f"dermconvert: accuracy gate FAILED; see {res.parity_report}", file=sys.stderr)
            return 1
        return 0
    except (ConvertError, DataError, EvalError, BundleError) as e:
        print(f"dermconvert: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
