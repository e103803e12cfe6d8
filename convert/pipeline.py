"""The conversion pipeline: checkpoint -> ONNX (+ parity) -> FP16 ONNX (+ gate) -> TensorRT engine (+ gate)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dermconvert.export import ConvertError, bundle_for_run, export_onnx, torch_parity
from dermconvert.fp16 import convert_fp16
from dermconvert.gate import GateResult, compare, write_report
from dermtrain.cache import build_cache
from dermtrain.data import load_records
from dermtrain.splits import read_manifest, select
from engines.preprocess import PreprocessSpec, normalize


@dataclass
class ConvertResult:
    onnx: Path
    fp16_onnx: Path | None = None
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


def sibling(onnx_path: Path, suffix: str) -> Path:
    return onnx_path.with_name(onnx_path.name.removesuffix(".onnx") + suffix)


def convert(src: Path, out: Path, fp16: bool = False, engine: Path | None = None, data: Path | None = None,
            split: Path | None = None, with_cam: bool = True, limit: int | None = None,
            opt_batches: tuple[int, ...] = (1, 32), max_batch: int = 64, log=print) -> ConvertResult:
    from dermtrain.evaluate import evaluate, load_run_model
    from engines.onnx_backend import OrtEngine

    run_dir, ckpt = resolve_checkpoint(Path(src))
    model, cfg, spec, state = load_run_model(run_dir, ckpt.stem)
    if data is not None and not (run_dir / "calibration.json").is_file():
        log("no calibration.json in the run: fitting temperature and melanoma threshold on validation first")
        evaluate(run_dir, data, "val", progress=False)
    if not (run_dir / "calibration.json").is_file():
        log("warning: no calibration.json (run `dermtrain eval` first): temperature 1, melanoma threshold 0.5")
    bundle = export_onnx(model, bundle_for_run(run_dir, state, spec, with_cam, str(ckpt)), out, with_cam)
    res = ConvertResult(onnx=out)
    extra: dict = {"source": str(ckpt), "model": cfg.model, "input_size": spec.size,
                   "temperature": bundle.temperature, "mel_threshold": bundle.mel_threshold}

    split = split or (run_dir / "split.csv")
    if data is not None:
        batch, labels = validation_batch(data, split, spec, limit)
        extra["images"] = f"{len(labels)} validation images of {split}"
    else:
        batch, labels = np.random.default_rng(0).normal(size=(8, 3, spec.size, spec.size)).astype(np.float32), None
        res.notes.append("no --data: PyTorch parity checked on 8 random inputs, no accuracy gate")
    par = torch_parity(model, out, batch)
    extra["torch_parity"] = {"n": par.n, "max_abs_logit_diff": par.max_abs_logit_diff,
                             "top1_agreement": par.top1_agreement}
    log(f"ONNX {out} (opset 17): PyTorch parity on {par.n} images: max |logit diff| {par.max_abs_logit_diff:.2e}, "
        f"top-1 agreement {par.top1_agreement:.2%}")
    if not par.ok():
        out.unlink(missing_ok=True)
        raise ConvertError(f"{out}: ONNX disagrees with PyTorch (max |logit diff| {par.max_abs_logit_diff:.2e}, "
                           f"top-1 {par.top1_agreement:.2%}); nothing written")

    if fp16 or engine is not None:
        ref = OrtEngine(out, "cpu")
        if fp16:
            res.fp16_onnx = sibling(out, ".fp16.onnx")
            convert_fp16(out, res.fp16_onnx, bundle)
            if labels is not None:
                g = compare(ref, OrtEngine(res.fp16_onnx, "cpu"), batch, labels, "FP16 ONNX (ONNX Runtime CPU)")
                res.gates.append(g)
                log(_gate_line(g))
                if not g.passed:
                    res.fp16_onnx.unlink()
                    res.fp16_onnx = None
        res.engine = _maybe_engine(out, engine, ref, batch, labels, res, opt_batches, max_batch, log)
        if labels is not None:
            res.parity_report = sibling(out, ".parity.json")
            write_report(res.gates, res.parity_report, extra)
    for n in res.notes:
        log(n)
    return res


def _gate_line(g: GateResult) -> str:
    verdict = "PASS" if g.passed else "FAIL (" + "; ".join(g.failures) + ")"
    return (f"gate {g.candidate} on {g.n} images: top-1 agreement {g.top1_agreement:.2%}, balanced accuracy "
            f"{g.balanced_accuracy_fp32:.4f} -> {g.balanced_accuracy_fp16:.4f}, melanoma recall "
            f"{g.melanoma_recall_fp32:.4f} -> {g.melanoma_recall_fp16:.4f}, max prob diff {g.max_prob_diff:.2e}: {verdict}")


def _maybe_engine(onnx_path, engine, ref, batch, labels, res, opt_batches, max_batch, log) -> Path | None:
    from engines.tensorrt_backend import TensorRTError, TrtEngine, build_engine, cached_engine_path, engine_cache_dir, trt_unavailable

    why = trt_unavailable()
    if why is not None:
        if engine is not None:
            raise ConvertError(f"cannot build TensorRT engine {engine}: {why}")
        res.notes.append(f"no TensorRT engine built: {why}")
        return None
    path = Path(engine) if engine is not None else cached_engine_path(onnx_path)
    try:
        build_engine(onnx_path, path, fp16=True, opt_batches=opt_batches, max_batch=max_batch,
                     timing_cache=engine_cache_dir() / "timing.cache")
        trt = TrtEngine(onnx_path, path, rebuild=False)
    except TensorRTError as e:
        raise ConvertError(str(e)) from None
    log(f"TensorRT FP16 engine {path} ({trt.info.gpu_name}, sm {trt.info.compute_capability}, TensorRT {trt.info.tensorrt_version})")
    if labels is not None:
        g = compare(ref, trt, batch, labels, f"TensorRT FP16 ({trt.info.gpu_name})")
        res.gates.append(g)
        log(_gate_line(g))
        if not g.passed:
            trt.close()
            path.unlink(missing_ok=True)
            Path(str(path) + ".json").unlink(missing_ok=True)
            return None
    return path


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
    if engine is not None:
        from engines.tensorrt_backend import TensorRTError, TrtEngine, trt_unavailable
        why = trt_unavailable()
        if why:
            raise ConvertError(f"cannot verify TensorRT engine {engine}: {why}")
        try:
            results.append(compare(ref, TrtEngine(fp32_onnx, engine, rebuild=False), batch, labels, "TensorRT FP16"))
        except TensorRTError as e:
            raise ConvertError(str(e)) from None
    if not results:
        raise ConvertError(f"{fp16_onnx}: nothing to verify (no FP16 ONNX; pass --engine for a TensorRT engine)")
    for g in results:
        log(_gate_line(g))
    write_report(results, sibling(fp32_onnx, ".parity.json"), {"reference": str(fp32_onnx),
                                                               "images": f"{len(labels)} validation images of {split}"})
    return results
