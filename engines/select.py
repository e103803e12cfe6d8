"""Opening a model on a backend: shipped models by name, and `auto` that says what it picked and why."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from engines.bundle import BundleError
from engines.engine import Engine

MODELS_DIR = Path(__file__).parent / "models"
BACKENDS = ("auto", "tensorrt", "cuda", "cpu", "ort-trt")


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


@dataclass(frozen=True)
class Choice:
    engine: Engine
    reason: str


def open_engine(model: str | os.PathLike | None = None, backend: str = "auto", threads: int = 0,
                max_batch: int = 64) -> Choice:
    """Load `model` on `backend`. auto: TensorRT when a matching engine and GPU exist, then ONNX Runtime on
    the GPU, then the CPU."""
    from engines.onnx_backend import OrtEngine, available_providers

    path = resolve_model(model)
    if backend not in BACKENDS:
        raise BundleError(f"unknown backend {backend!r}: use {', '.join(BACKENDS)}")
    if backend == "tensorrt":
        from engines.tensorrt_backend import TrtEngine, TensorRTError, trt_unavailable
        why = trt_unavailable()
        if why:
            raise BundleError(f"TensorRT backend unavailable: {why}")
        try:
            return Choice(TrtEngine(path), "TensorRT requested")
        except TensorRTError as e:
            raise BundleError(str(e)) from None
    if backend in ("cpu", "cuda", "ort-trt"):
        return Choice(OrtEngine(path, backend, threads, max_batch), f"{backend} requested")

    reasons = []
    from engines.tensorrt_backend import TensorRTError, trt_unavailable
    why = trt_unavailable()
    if why is None:
        from engines.tensorrt_backend import TrtEngine, cached_engine_path
        cached = cached_engine_path(path)
        if cached.is_file():
            try:
                return Choice(TrtEngine(path, cached, rebuild=False), f"TensorRT engine {cached.name} matches this GPU")
            except TensorRTError as e:
                reasons.append(str(e))
        else:
            reasons.append("no TensorRT engine built for this GPU yet (dermconvert --engine builds one)")
    else:
        reasons.append(why)
    if "CUDAExecutionProvider" in available_providers():
        return Choice(OrtEngine(path, "cuda", threads, max_batch), "ONNX Runtime on CUDA; " + "; ".join(reasons))
    reasons.append("ONNX Runtime has no CUDA provider here")
    return Choice(OrtEngine(path, "cpu", threads, max_batch), "CPU; " + "; ".join(reasons))
