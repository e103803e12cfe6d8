"""ONNX Runtime backend: CPU by default, CUDA or TensorRT execution providers where installed."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from engines.bundle import BundleError, ModelBundle, from_metadata
from engines.engine import Engine

PROVIDER_ALIASES = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "ort-trt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}
# ONNX Runtime lets CUDA round FP32 convolutions and matmuls to TF32 on Ampere and newer GPUs by default. With that
# default the FP32 default model on an H200 moved melanoma scores by up to 0.0035 against the CPU and flipped 2 of 512
# flags lying near the threshold (docs/models/experiments/gpu_h200/): an FP32 bundle runs in FP32, as its gate
# measured it.
PROVIDER_OPTIONS = {"CUDAExecutionProvider": {"use_tf32": "0"}}


def session_providers(names: list[str]) -> list[str | tuple[str, dict[str, str]]]:
    """ONNX Runtime's providers argument: each name, with its options where it has some."""
    return [(n, PROVIDER_OPTIONS[n]) if n in PROVIDER_OPTIONS else n for n in names]


def import_ort():
    """onnxruntime, or a one-line BundleError saying how to install exactly one of its two packages."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise BundleError("ONNX Runtime is not installed: pip install 'dermedge[cpu]' (or 'dermedge[gpu]' with an "
                          "NVIDIA GPU; never both)") from None
    return ort


def ort_conflict() -> str | None:
    """Both `onnxruntime` and `onnxruntime-gpu` installed overwrite each other's files: the CUDA provider goes."""
    from importlib.metadata import PackageNotFoundError, version

    have = []
    for dist in ("onnxruntime", "onnxruntime-gpu"):
        try:
            have.append(f"{dist} {version(dist)}")
        except PackageNotFoundError:
            pass
    if len(have) < 2:
        return None
    return (f"both {' and '.join(have)} are installed and overwrite each other: "
            "pip uninstall -y onnxruntime onnxruntime-gpu, then install one")


def available_providers() -> list[str]:
    return import_ort().get_available_providers()


class OrtEngine(Engine):
    def __init__(self, path: str | os.PathLike, device: str = "cpu", threads: int = 0, max_batch: int = 64):
        ort = import_ort()

        self.path = Path(path)
        if not self.path.is_file():
            raise BundleError(f"{self.path}: model file not found")
        wanted = PROVIDER_ALIASES.get(device)
        if wanted is None:
            raise BundleError(f"unknown ONNX Runtime device {device!r}: use {', '.join(PROVIDER_ALIASES)}")
        have = set(available_providers())
        providers = [p for p in wanted if p in have]
        if wanted[0] not in have:
            raise BundleError(f"ONNX Runtime here has no {wanted[0]} (available: {', '.join(sorted(have))})")
        self.session = self._session(ort, providers, threads)
        batch_dim = self.session.get_inputs()[0].shape[0]
        if max_batch == 1 and isinstance(batch_dim, str):
            # A live camera runs one image at a time. With the batch dimension fixed ORT can fold shape arithmetic
            # left in a graph (TF "same" padding in bundles from before dermconvert folded it, or from other tools):
            # such a Lite0 bundle ran ~30% faster at batch 1 on 2 CPU cores.
            self.session = self._session(ort, providers, threads, fixed={batch_dim: 1})
        meta = self.session.get_modelmeta().custom_metadata_map
        self.bundle: ModelBundle = from_metadata(meta, str(self.path))
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]
        if "logits" not in self.output_names:
            raise BundleError(f"{self.path}: the graph has no 'logits' output (outputs: {', '.join(self.output_names)})")
        self.backend = f"onnxruntime:{self.session.get_providers()[0]}"
        self.max_batch = max_batch
        self.check_outputs(str(self.path))

    def _session(self, ort, providers: list[str], threads: int, fixed: dict[str, int] | None = None):
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        for name, size in (fixed or {}).items():
            opts.add_free_dimension_override_by_name(name, size)
        try:
            return ort.InferenceSession(str(self.path), sess_options=opts, providers=session_providers(providers))
        except Exception as e:  # noqa: BLE001 - ORT raises several types for a bad file
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise BundleError(f"{self.path}: not a loadable ONNX model ({first[:200]})") from None

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        outs = self.session.run(None, {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)})
        named = dict(zip(self.output_names, outs))
        return named["logits"].astype(np.float32), named.get("cam")
