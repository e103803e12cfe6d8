"""Opening a model on a backend: shipped models by name, and `auto` that says what it picked and why."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from engines.bundle import BundleError
from engines.engine import Engine
from engines.errors import one_line

MODELS_DIR = Path(__file__).parent / "models"
BACKENDS = ("auto", "tensorrt", "cuda", "cpu", "ort-trt")
PRECISIONS = ("fp32", "fp16", "int8")


def _index() -> dict:
    path = MODELS_DIR / "index.json"
    return json.loads(path.read_text()) if path.is_file() else {"default": None, "models": {}}


def shipped_models() -> dict[str, Path]:
    return {name: MODELS_DIR / entry["file"] for name, entry in _index()["models"].items()}


def default_model() -> Path:
    """The model shipped inside the package as the default."""
    name = _index()["default"]
    if not name:
        raise BundleError(f"{MODELS_DIR}: no default model is shipped in this package")
    return shipped_models()[name]


def resolve_model(model: str | os.PathLike | None) -> Path:
    """None or 'default' -> the shipped default; a shipped name (e.g. 'convnext') -> its file; else a path."""
    if model is None or str(model) == "default":
        return default_model()
    shipped = shipped_models()
    if str(model) in shipped:
        return shipped[str(model)]
    p = Path(model)
    if not p.is_file():
        names = ", ".join(["default", *shipped]) or "none"
        raise BundleError(f"{p}: model file not found (shipped models: {names})")
    return p


def base_model(path: Path) -> Path:
    """M.fp16.onnx / M.int8.onnx -> M.onnx (the FP32 model they were gated against)."""
    for p in PRECISIONS[1:]:
        if path.name.endswith(f".{p}.onnx"):
            return path.with_name(path.name[: -len(f".{p}.onnx")] + ".onnx")
    return path


def with_precision(path: Path, precision: str | None) -> Path:
    """The gated file of `precision` beside the FP32 model (`M.onnx`, `M.fp16.onnx`, `M.int8.onnx`); None keeps
    the file as given. Only files `dermconvert` wrote after their accuracy gate passed sit there."""
    if precision is None:
        return path
    if precision not in PRECISIONS:
        raise BundleError(f"unknown precision {precision!r}: use {', '.join(PRECISIONS)}")
    base = base_model(path)
    want = base if precision == "fp32" else base.with_name(f"{base.name.removesuffix('.onnx')}.{precision}.onnx")
    if not want.is_file():
        raise BundleError(f"{want}: no gated {precision.upper()} model beside {base.name} "
                          f"(`dermconvert RUN --onnx {base.name} --{precision}` writes one when it passes its gate)")
    return want


@dataclass(frozen=True)
class Choice:
    engine: Engine
    reason: str


def open_engine(model: str | os.PathLike | None = None, backend: str = "auto", threads: int = 0,
                max_batch: int = 64, precision: str | None = None) -> Choice:
    """Load `model` (its gated `precision` file) on `backend`. auto: TensorRT when an engine for this GPU is
    cached, then ONNX Runtime on the GPU, then the CPU; the reason for each step down is in Choice.reason."""
    if backend not in BACKENDS:
        raise BundleError(f"unknown backend {backend!r}: use {', '.join(BACKENDS)}")
    path = with_precision(resolve_model(model), precision)
    choice = _open(path, backend, threads, max_batch)
    have = choice.engine.bundle.precision
    if precision is not None and have != precision:
        raise BundleError(f"{path}: its metadata says {have}, not {precision}: not a file dermconvert wrote")
    return choice


def _open(path: Path, backend: str, threads: int, max_batch: int) -> Choice:
    from engines.onnx_backend import OrtEngine, available_providers, ort_conflict

    if backend == "tensorrt":
        from engines.tensorrt_backend import TensorRTError, TrtEngine, trt_unavailable
        why = trt_unavailable()
        if why:
            raise BundleError(f"TensorRT backend unavailable: {why}")
        try:
            return Choice(TrtEngine(path, max_batch=max_batch), "TensorRT requested")
        except TensorRTError as e:
            raise BundleError(str(e)) from None
        except Exception as e:  # noqa: BLE001 - whatever a broken TensorRT install raises: one line
            raise BundleError(f"{path}: TensorRT failed ({one_line(e)})") from None
    if backend in ("cpu", "cuda", "ort-trt"):
        return Choice(OrtEngine(path, backend, threads, max_batch), f"{backend} requested")

    reasons = []
    engine = _cached_tensorrt(path, max_batch, reasons)
    if engine is not None:
        return Choice(engine, f"TensorRT engine {engine.engine_path.name} matches this GPU")
    if "CUDAExecutionProvider" in available_providers():
        return Choice(OrtEngine(path, "cuda", threads, max_batch), "ONNX Runtime on CUDA; " + "; ".join(reasons))
    reasons.append(ort_conflict() or "ONNX Runtime has no CUDA provider here")
    return Choice(OrtEngine(path, "cpu", threads, max_batch), "CPU; " + "; ".join(reasons))


def _cached_tensorrt(path: Path, max_batch: int, reasons: list[str]) -> Engine | None:
    """A TensorRT engine already built for this model, GPU and batch size, or None with the reason appended.
    Whatever TensorRT or CUDA raises, auto falls back: it never ends the program."""
    try:
        from engines.tensorrt_backend import TrtEngine, cached_engine_path, trt_unavailable
        why = trt_unavailable()
        if why is not None:
            reasons.append(why)
            return None
        cached = cached_engine_path(path, max_batch)
        if not cached.is_file():
            reasons.append("no TensorRT engine built for this GPU yet (`--backend tensorrt` builds one)")
            return None
        return TrtEngine(path, cached, rebuild=False, max_batch=max_batch)
    except Exception as e:  # noqa: BLE001 - TensorRTError, and anything else a broken install raises
        reasons.append(f"TensorRT not used ({one_line(e)})")
        return None
