"""The conversion pipeline: checkpoint -> ONNX (+ parity) -> FP16 / INT8 ONNX (+ gate each) -> a strongly typed
TensorRT engine from one of those gated files (+ gate)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dermconvert.export import ConvertError, bundle_for_run, export_onnx, torch_parity
from dermconvert.fp16 import convert_fp16
from dermconvert.gate import LIMITS, GateResult, compare, write_report
from dermconvert.int8 import quantize_int8
from dermtrain.cache import build_cache
from dermtrain.data import load_records
from dermtrain.splits import read_manifest, select
from engines.bench import images_per_second
from engines.fsutil import atomic_path, sibling
from engines.preprocess import PreprocessSpec, normalize


@dataclass
class ConvertResult:
    onnx: Path
    fp16_onnx: Path | None = None
    int8_onnx: Path | None = None
    engine: Path | None = None
    parity_report: Path | None = None
    gates: list[GateResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(g.passed for g in self.gates)


def validation_batch(data_dir: Path, split_csv: Path, spec: PreprocessSpec, limit: int | None = None,
                     progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Every validation image of the manifest (or a stratified `limit`), preprocessed the shipped way."""
    recs = select(read_manifest(split_csv), load_records(data_dir), "val", limit, seed=0)
    x, y = build_cache(recs, spec, "caching val", progress)
    return normalize(x, spec), y


def calibration_batch(data_dir: Path, split_csv: Path, spec: PreprocessSpec, n: int, progress: bool = True) -> np.ndarray:
    """A stratified sample of `n` training images (never validation: the gate measures on those)."""
    recs = select(read_manifest(split_csv), load_records(data_dir), "train", n, seed=0)
    x, _ = build_cache(recs, spec, "caching calibration", progress)
    return normalize(x, spec)


def resolve_checkpoint(src: Path) -> tuple[Path, Path]:
    """(run folder, checkpoint file) from either."""
    if src.is_dir():
        ckpt = src / "best.pt"
        if not ckpt.is_file():
            raise ConvertError(f"{src}: no best.pt in this run folder")
        return src, ckpt
    if src.is_file():
        return src.parent, src
    raise ConvertError(f"{src}: no such run folder or checkpoint")


def convert(src: Path, out: Path, fp16: bool = False, engine: Path | None = None, data: Path | None = None,
            split: Path | None = None, with_cam: bool = True, limit: int | None = None, max_batch: int = 32,
            int8: bool = False, engine_precision: str | None = None, calib_images: int = 512, int8_signed: bool = False,
            log=print) -> ConvertResult:
    from dermtrain.evaluate import evaluate, load_run_model
    from engines.onnx_backend import OrtEngine

    run_dir, ckpt = resolve_checkpoint(Path(src))
    model, cfg, spec, state = load_run_model(run_dir, ckpt.stem)
    if data is not None and not (run_dir / "calibration.json").is_file():
        log("no calibration.json in the run: fitting temperature and melanoma threshold on validation first")
        evaluate(run_dir, data, "val", progress=False)
    if not (run_dir / "calibration.json").is_file():
        log("warning: no calibration.json (run `dermtrain eval` first): temperature 1, melanoma threshold 0.5")
    res = ConvertResult(onnx=out)
    split = split or (run_dir / "split.csv")
    if data is not None:
        batch, labels = validation_batch(data, split, spec, limit)
    else:
        batch, labels = np.random.default_rng(0).normal(size=(8, 3, spec.size, spec.size)).astype(np.float32), None
        res.notes.append("no --data: PyTorch parity checked on 8 random inputs, no accuracy gate")
    with atomic_path(out) as tmp:  # the ONNX file appears only once it agrees with PyTorch
        bundle = export_onnx(model, bundle_for_run(run_dir, state, spec, with_cam, str(ckpt)), tmp, with_cam)
        par = torch_parity(model, tmp, batch)
        log(f"ONNX {out} (opset 17): PyTorch parity on {par.n} images: max |logit diff| "
            f"{par.max_abs_logit_diff:.2e}, top-1 agreement {par.top1_agreement:.2%}")
        if not par.ok():
            raise ConvertError(f"{out}: ONNX disagrees with PyTorch (max |logit diff| {par.max_abs_logit_diff:.2e}, "
                               f"top-1 {par.top1_agreement:.2%}); nothing written")
    extra: dict = {"source": str(ckpt), "model": cfg.model, "input_size": spec.size,
                   "temperature": bundle.temperature, "mel_threshold": bundle.mel_threshold,
                   "mel_flag_offsets": list(bundle.mel_flag_offsets),
                   "torch_parity": {"n": par.n, "max_abs_logit_diff": par.max_abs_logit_diff,
                                    "top1_agreement": par.top1_agreement}}
    if labels is not None:
        extra["images"] = f"{len(labels)} validation images of {split}"

    if fp16 or int8 or engine is not None:
        ref = OrtEngine(out, "cpu")
        if int8 and labels is None:
            raise ConvertError("--int8 needs --data: it calibrates on training images and is gated on validation images")
        _reduced_precisions(ref, res, extra, data, split, batch, labels, fp16, int8, calib_images, int8_signed, log)
        res.engine = _maybe_engine(res, engine, engine_precision, ref, batch, labels, max_batch, log)
        if labels is not None:
            res.parity_report = write_report(res.gates, out, extra)
    for n in res.notes:
        log(n)
    return res


def _reduced_precisions(ref, res: ConvertResult, extra: dict, data: Path | None, split: Path, batch, labels,
                        fp16: bool, int8: bool, calib_images: int, int8_signed: bool, log) -> None:
    """The FP16 and INT8 files of the FP32 bundle `ref` was loaded from (res.onnx), each kept only if it passes its
    gate: what `dermconvert RUN` and `dermconvert derive` share."""
    src, bundle = res.onnx, ref.bundle
    if fp16:
        res.fp16_onnx = _gated(ref, sibling(src, ".fp16.onnx"), lambda dst: convert_fp16(src, dst, bundle),
                               batch, labels, "FP16 ONNX (ONNX Runtime CPU)", res, log)
    if int8:
        calib = calibration_batch(data, split, bundle.preprocess, calib_images)
        extra["int8_calibration"] = f"{len(calib)} training images of {split}"
        res.int8_onnx = _gated(ref, sibling(src, ".int8.onnx"),
                               lambda dst: quantize_int8(src, dst, calib, bundle, log, int8_signed),
                               batch, labels, "INT8 ONNX (ONNX Runtime CPU)", res, log, speed=True)


class _GateFailed(Exception):
    pass


def _gated(ref, dst: Path, make, batch, labels, name: str, res: ConvertResult, log, speed: bool = False) -> Path | None:
    """make() the candidate under a temporary name and gate it against `ref`: `dst` appears only if it passes (or
    when there are no labels to gate on, which the caller has said in a note). A `dst` left by an earlier conversion
    goes first, so a process that dies mid-gate leaves no ungated file beside the model for `--precision` to run."""
    from engines.onnx_backend import OrtEngine

    dst.unlink(missing_ok=True)
    try:
        with atomic_path(dst) as tmp:
            make(tmp)
            if labels is None:
                return dst
            cand = OrtEngine(tmp, "cpu")
            g = compare(ref, cand, batch, labels, name)
            if speed:
                b = batch[:32]
                ips32, ips = images_per_second(ref, b), images_per_second(cand, b)
                g.speed = {"fp32 images/s (batch 32)": round(ips32, 1),
                           f"{cand.bundle.precision} images/s (batch 32)": round(ips, 1),
                           "speed-up": round(ips / ips32, 2)}
            res.gates.append(g)
            log(_gate_line(g))
            if not g.passed:
                raise _GateFailed
        return dst
    except _GateFailed:
        return None


def _gate_line(g: GateResult) -> str:
    verdict = "PASS" if g.passed else "FAIL (" + "; ".join(g.failures) + ")"
    return (f"gate {g.candidate} on {g.n} images: top-1 agreement {g.top1_agreement:.2%}, balanced accuracy "
            f"{g.balanced_accuracy_fp32:.4f} -> {g.balanced_accuracy_fp16:.4f}, melanoma recall "
            f"{g.melanoma_recall_fp32:.4f} -> {g.melanoma_recall_fp16:.4f}, max prob diff {g.max_prob_diff:.2e}"
            + "".join(f", {k} {v}" for k, v in g.speed.items()) + f": {verdict}")


def _maybe_engine(res: ConvertResult, engine: Path | None, precision: str | None, ref, batch, labels, max_batch: int,
                  log) -> Path | None:
    """A strongly typed TensorRT engine from the gated ONNX file of `precision` (default: FP16 when that was
    made, else FP32), gated itself; a note (or, when --engine was asked for, an error) where TensorRT is missing."""
    from engines.tensorrt_backend import TensorRTError, TrtEngine, build_engine, cached_engine_path, timing_cache_path, trt_unavailable

    why = trt_unavailable()
    if why is not None:
        if engine is not None:
            raise ConvertError(f"cannot build TensorRT engine {engine}: {why}")
        res.notes.append(f"no TensorRT engine built: {why}")
        return None
    precision = precision or ("fp16" if res.fp16_onnx else "fp32")
    src = {"fp32": res.onnx, "fp16": res.fp16_onnx, "int8": res.int8_onnx}[precision]
    if src is None:
        raise ConvertError(f"no gated {precision.upper()} ONNX to build a TensorRT engine from "
                           f"(pass --{precision}, and it must pass its gate)")
    path = Path(engine) if engine is not None else cached_engine_path(src, max_batch)
    try:
        build_engine(src, path, max_batch=max_batch, timing_cache=timing_cache_path(), log=log)
        trt = TrtEngine(src, path, rebuild=False, max_batch=max_batch)
    except TensorRTError as e:
        raise ConvertError(str(e)) from None
    log(f"TensorRT engine {path} from {src.name} ({trt.info.gpu}, TensorRT {trt.info.tensorrt_version})")
    if labels is not None:
        g = compare(ref, trt, batch, labels, f"TensorRT {precision.upper()} ({trt.info.gpu})", LIMITS.get(precision))
        res.gates.append(g)
        log(_gate_line(g))
        if not g.passed:
            trt.close()
            path.unlink(missing_ok=True)
            Path(str(path) + ".json").unlink(missing_ok=True)
            return None
    return path


def derive(fp32_onnx: Path, data: Path, split: Path, fp16: bool, int8: bool, limit: int | None = None,
           calib_images: int = 512, int8_signed: bool = False, log=print) -> ConvertResult:
    """`dermconvert derive`: the gated FP16 / INT8 files of an FP32 bundle ONNX, without its checkpoint."""
    from engines.onnx_backend import OrtEngine

    ref = OrtEngine(fp32_onnx, "cpu")
    batch, labels = validation_batch(data, split, ref.bundle.preprocess, limit)
    res = ConvertResult(onnx=fp32_onnx)
    extra: dict = {"reference": str(fp32_onnx), "images": f"{len(labels)} validation images of {split}"}
    _reduced_precisions(ref, res, extra, data, split, batch, labels, fp16, int8, calib_images, int8_signed, log)
    res.parity_report = write_report(res.gates, fp32_onnx, extra)
    return res


def verify(fp32_onnx: Path, data: Path, split: Path, fp16_onnx: Path | None = None, engine: Path | None = None,
           limit: int | None = None, log=print) -> list[GateResult]:
    """`dermconvert verify`: the gate for already converted files."""
    from engines.onnx_backend import OrtEngine

    ref = OrtEngine(fp32_onnx, "cpu")
    batch, labels = validation_batch(data, split, ref.bundle.preprocess, limit)
    results = []
    fp16_onnx = fp16_onnx or sibling(fp32_onnx, ".fp16.onnx")
    if fp16_onnx.is_file():
        results.append(compare(ref, OrtEngine(fp16_onnx, "cpu"), batch, labels, "FP16 ONNX (ONNX Runtime CPU)"))
    if sibling(fp32_onnx, ".int8.onnx").is_file():
        results.append(compare(ref, OrtEngine(sibling(fp32_onnx, ".int8.onnx"), "cpu"), batch, labels,
                               "INT8 ONNX (ONNX Runtime CPU)"))
    if engine is not None:
        from engines.tensorrt_backend import TensorRTError, TrtEngine, read_info, trt_unavailable
        why = trt_unavailable()
        if why:
            raise ConvertError(f"cannot verify TensorRT engine {engine}: {why}")
        try:
            info = read_info(Path(engine))
            src = fp32_onnx if info.precision == "fp32" else sibling(fp32_onnx, f".{info.precision}.onnx")
            trt = TrtEngine(src, engine, rebuild=False, max_batch=info.max_batch)
            results.append(compare(ref, trt, batch, labels, f"TensorRT {info.precision.upper()}", LIMITS.get(info.precision)))
        except TensorRTError as e:
            raise ConvertError(str(e)) from None
    if not results:
        raise ConvertError(f"{fp32_onnx}: nothing to verify (no FP16 or INT8 ONNX beside it; pass --engine for a TensorRT engine)")
    for g in results:
        log(_gate_line(g))
    write_report(results, fp32_onnx, {"reference": str(fp32_onnx), "images": f"{len(labels)} validation images of {split}"})
    return results
