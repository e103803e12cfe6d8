"""`dermconvert RUN_OR_CHECKPOINT --onnx OUT.onnx [--fp16] [--int8] [--engine PATH] [--data DIR]`,
`dermconvert verify MODEL.onnx --data DIR --split split.csv`, `dermconvert derive MODEL.onnx --fp16 ...`,
`dermconvert ensemble M1.onnx M2.onnx ... --onnx OUT.onnx --data DIR --split split.csv [--fp16]`,
`dermconvert flag MODEL.onnx --data DIR --split split.csv [--out OUT.onnx] [--fp16]`."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", help="HAM10000 folder for parity and the accuracy gate; default $DERM_DATA")
    p.add_argument("--split", help="split manifest (default: the run's split.csv)")
    p.add_argument("--limit", type=int, help="gate on a stratified subset of N validation images (smoke runs)")


def convert_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dermconvert", description="Checkpoint -> ONNX bundle -> FP16 / INT8 ONNX -> "
                                "TensorRT, each gated on real validation images. `dermconvert verify -h` for the gate alone.")
    p.add_argument("source", help="run folder (uses best.pt) or checkpoint file")
    p.add_argument("--onnx", required=True, help="output ONNX bundle")
    p.add_argument("--fp16", action="store_true", help="also OUT.fp16.onnx, kept if it passes its gate")
    p.add_argument("--int8", action="store_true", help="also OUT.int8.onnx (QDQ, calibrated on training images), kept "
                   "if it passes its gate (top-1 agreement >= 98.5%%, balanced accuracy and melanoma recall within 1 point)")
    p.add_argument("--calib-images", type=int, default=512, help="INT8 calibration images from the training split")
    p.add_argument("--int8-signed", action="store_true", help="INT8 with signed symmetric activations, the only form "
                   "TensorRT takes (ONNX Runtime CPU runs it slower than FP32; the default unsigned form is for it)")
    p.add_argument("--engine", help="TensorRT engine path (default: the per-GPU cache); an error if TensorRT is missing")
    p.add_argument("--engine-precision", choices=("fp32", "fp16", "int8"),
                   help="the gated ONNX the engine is built from (default: fp16 with --fp16, else fp32)")
    p.add_argument("--no-cam", action="store_true", help="no class-activation-map output")
    p.add_argument("--max-batch", type=int, default=32, help="largest batch the TensorRT engine takes")
    _common(p)
    return p


def derive_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dermconvert derive", description="The gated FP16 / INT8 files of an FP32 bundle "
                                "ONNX (M.fp16.onnx, M.int8.onnx beside it), without the checkpoint it came from")
    p.add_argument("model", help="the FP32 ONNX bundle")
    p.add_argument("--fp16", action="store_true")
    p.add_argument("--int8", action="store_true")
    p.add_argument("--calib-images", type=int, default=512, help="INT8 calibration images from the training split")
    p.add_argument("--int8-signed", action="store_true", help="INT8 with signed symmetric activations, the only form "
                   "TensorRT takes (ONNX Runtime CPU runs it slower than FP32; the default unsigned form is for it)")
    _common(p)
    return p


def ensemble_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dermconvert ensemble", description="One ensemble bundle from several FP32 "
                                "bundles: their calibrated log-probabilities averaged in one ONNX graph, its temperature "
                                "and melanoma thresholds fitted on validation")
    p.add_argument("members", nargs="+", help="FP32 ONNX bundles trained on the same split")
    p.add_argument("--onnx", required=True, help="output ONNX bundle")
    p.add_argument("--fp16", action="store_true", help="also OUT.fp16.onnx, kept if it passes its gate")
    p.add_argument("--no-cam", action="store_true", help="no class-activation-map output")
    _common(p)
    return p


def flag_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dermconvert flag", description="Choose a bundle's melanoma flag (its own score's "
                                "offsets and thresholds) on the validation images of its split, as dermtrain eval does "
                                "for a run, and write the bundle again with only its metadata changed")
    p.add_argument("model", help="the FP32 ONNX bundle (rewritten in place unless --out)")
    p.add_argument("--out", help="write the flagged bundle here instead")
    p.add_argument("--fp16", action="store_true", help="then derive its gated FP16 file again, with the new metadata")
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
    sub = argv[0] if argv and argv[0] in ("verify", "derive", "ensemble", "flag") else None
    parser = {"verify": verify_parser, "derive": derive_parser, "ensemble": ensemble_parser, "flag": flag_parser,
              None: convert_parser}[sub]()
    a = parser.parse_args(argv[1:] if sub else argv)
    try:
        data = resolve_data_dir(a.data) if (a.data or os.environ.get("DERM_DATA")) else None
        if sub == "derive":
            from dermconvert.pipeline import derive
            if data is None or not a.split:
                raise ConvertError("derive needs --data (or DERM_DATA) and --split")
            if not (a.fp16 or a.int8) or a.calib_images < 1:
                raise ConvertError("derive needs --fp16 and/or --int8 (and a positive --calib-images)")
            res = derive(Path(a.model), data, Path(a.split), a.fp16, a.int8, a.limit, a.calib_images, a.int8_signed)
            return 0 if res.passed else 1
        if sub == "ensemble":
            return _ensemble(a, data)
        if sub == "flag":
            return _flag(a, data)
        if sub == "verify":
            from dermconvert.pipeline import verify
            if data is None or not a.split:
                raise ConvertError("verify needs --data (or DERM_DATA) and --split")
            results = verify(Path(a.model), data, Path(a.split), Path(a.fp16_onnx) if a.fp16_onnx else None,
                             Path(a.engine) if a.engine else None, a.limit)
            return 0 if all(r.passed for r in results) else 1
        from dermconvert.pipeline import convert
        if a.calib_images < 1:
            raise ConvertError(f"--calib-images {a.calib_images}: give a positive number")
        res = convert(Path(a.source), Path(a.onnx), a.fp16, Path(a.engine) if a.engine else None, data,
                      Path(a.split) if a.split else None, not a.no_cam, a.limit, a.max_batch, a.int8,
                      a.engine_precision, a.calib_images, a.int8_signed)
        if not res.passed:
            print(f"dermconvert: accuracy gate FAILED; see {res.parity_report}", file=sys.stderr)
            return 1
        return 0
    except (ConvertError, DataError, EvalError, BundleError) as e:
        print(f"dermconvert: error: {e}", file=sys.stderr)
        return 2


def _ensemble(a, data) -> int:
    from dermconvert.ensemble import build_ensemble
    from dermconvert.export import ConvertError
    from dermconvert.gate import write_report
    from dermconvert.pipeline import derive

    if data is None or not a.split:
        raise ConvertError("ensemble needs --data (or DERM_DATA) and --split: it is calibrated on validation images")
    out = Path(a.onnx)
    if any(Path(m).resolve() == out.resolve() for m in a.members):
        raise ConvertError(f"{out}: the output would overwrite one of the members")
    report = build_ensemble([Path(m) for m in a.members], out, data, Path(a.split), a.limit, not a.no_cam)
    write_report([], out, report)
    if a.fp16:
        return 0 if derive(out, data, Path(a.split), True, False, a.limit).passed else 1
    return 0


def _flag(a, data) -> int:
    from dermconvert.export import ConvertError
    from dermconvert.flag import flag_bundle
    from dermconvert.pipeline import derive

    if data is None or not a.split:
        raise ConvertError("flag needs --data (or DERM_DATA) and --split: the flag is chosen on validation images")
    from engines.fsutil import sibling

    out = Path(a.out) if a.out else Path(a.model)
    flag_bundle(Path(a.model), data, Path(a.split), out, a.limit)
    if a.fp16:
        return 0 if derive(out, data, Path(a.split), True, False, a.limit).passed else 1
    stale = [f.name for f in (sibling(out, ".fp16.onnx"), sibling(out, ".int8.onnx")) if f.is_file()]
    if stale:  # a reduced-precision file would still raise the previous flag
        print(f"dermconvert: note: the previous flag is still in {', '.join(stale)}: derive again "
              f"(dermconvert derive {out} --fp16/--int8 ...)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
