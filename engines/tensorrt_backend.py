"""TensorRT 10 backend: build FP16 engines from a bundle's ONNX, cache them per GPU and TensorRT version,
and run them with cuda-python for device memory.

`tensorrt` and `cuda-python` are optional (extra `tensorrt`); without them `trt_unavailable()` says why in
one line and the runtime falls back to ONNX Runtime.
"""
from __future__ import annotations

import json
import os
import platform
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from engines.bundle import BundleError, ModelBundle, from_metadata
from engines.engine import Engine
from engines.fsutil import atomic_path, sha256_file, write_json
from engines.precision import fp16_unsafe

# Layers that overflow or lose too much in FP16 (ConvNeXt's LayerNorm variance above all): kept in FP32.
FP32_LAYER_TYPES = ("NORMALIZATION", "REDUCE", "SOFTMAX")
FP32_ELEMENTWISE_OPS = ("POW",)
FP32_UNARY_OPS = ("SQRT",)


class TensorRTError(Exception):
    """TensorRT cannot build or run this engine here; str() is one line."""


def _import_trt():
    try:
        import tensorrt as trt
    except ImportError:
        raise TensorRTError("TensorRT is not installed (pip install 'dermedge[tensorrt]' on an NVIDIA machine)") from None
    if int(trt.__version__.split(".")[0]) < 10:
        raise TensorRTError(f"TensorRT {trt.__version__} is too old: DermEdge needs TensorRT 10")
    return trt


def _import_cudart():
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError:
            raise TensorRTError("cuda-python is not installed (pip install 'dermedge[tensorrt]')") from None
    return cudart


def _check(result):
    """cuda-python calls return (err, *values); raise on error, return the values."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise TensorRTError(f"CUDA error {err}")
    return values[0] if len(values) == 1 else values


def trt_unavailable() -> str | None:
    """None when TensorRT, cuda-python and a GPU are all here; otherwise the reason, in one line."""
    try:
        _import_trt()
        cudart = _import_cudart()
        count = _check(cudart.cudaGetDeviceCount())
    except TensorRTError as e:
        return str(e)
    except Exception as e:  # noqa: BLE001 - no driver raises from deep inside cuda-python
        return f"no usable CUDA driver ({e})"
    return None if count > 0 else "no NVIDIA GPU found"


@dataclass(frozen=True)
class EngineInfo:
    """The JSON sidecar of an engine: what it was built from and for."""
    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    onnx_sha256: str
    precision: str
    min_batch: int
    opt_batches: tuple[int, ...]
    max_batch: int
    input_size: int
    host: str = ""

    def mismatch(self, other: "EngineInfo") -> str | None:
        for field in ("tensorrt_version", "gpu_name", "compute_capability", "onnx_sha256", "precision"):
            a, b = getattr(self, field), getattr(other, field)
            if a != b:
                return f"{field} is {a!r} in the engine, {b!r} here"
        return None


def gpu_identity() -> tuple[str, str]:
    cudart = _import_cudart()
    dev = _check(cudart.cudaGetDevice())
    props = _check(cudart.cudaGetDeviceProperties(dev))
    name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
    return name.strip("\x00 "), f"{props.major}.{props.minor}"


def engine_cache_dir() -> Path:
    base = os.environ.get("DERMEDGE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "dermedge")
    return Path(base) / "engines"


def cached_engine_path(onnx_path: Path, precision: str = "fp16") -> Path:
    """One engine per (ONNX content, GPU, TensorRT version, precision): never mixed."""
    trt = _import_trt()
    gpu, cc = gpu_identity()
    key = f"{sha256_file(onnx_path)[:16]}-{precision}-trt{trt.__version__}-sm{cc.replace('.', '')}-{gpu.replace(' ', '_')}"
    return engine_cache_dir() / f"{onnx_path.stem}-{key}.plan"


def expected_info(onnx_path: Path, precision: str, opt_batches: tuple[int, ...], max_batch: int,
                  input_size: int) -> EngineInfo:
    trt = _import_trt()
    gpu, cc = gpu_identity()
    return EngineInfo(trt.__version__, gpu, cc, sha256_file(onnx_path), precision, 1, tuple(opt_batches),
                      max_batch, input_size, platform.node())


def _kernel_unsafe(layer, trt) -> bool:
    """Convolution weights FP16 cannot hold (the same rule as the FP16 ONNX); False when TensorRT keeps the
    weights elsewhere (a constant input) and the kernel is not readable here."""
    try:
        layer.__class__ = trt.IConvolutionLayer
        kernel = layer.kernel
        return kernel is not None and kernel.size > 0 and fp16_unsafe(kernel.numpy())
    except Exception:  # noqa: BLE001 - optional refinement, never a build failure
        return False


def _pin_fp32(network, trt) -> int:
    pinned = 0
    types = {getattr(trt.LayerType, t) for t in FP32_LAYER_TYPES if hasattr(trt.LayerType, t)}
    ew_ops = {getattr(trt.ElementWiseOperation, o) for o in FP32_ELEMENTWISE_OPS}
    un_ops = {getattr(trt.UnaryOperation, o) for o in FP32_UNARY_OPS}
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        keep = layer.type in types
        if layer.type == trt.LayerType.CONVOLUTION:
            keep = _kernel_unsafe(layer, trt)
        elif layer.type == trt.LayerType.ELEMENTWISE:
            layer.__class__ = trt.IElementWiseLayer
            keep = layer.op in ew_ops
        elif layer.type == trt.LayerType.UNARY:
            layer.__class__ = trt.IUnaryLayer
            keep = layer.op in un_ops
        if keep:
            layer.precision = trt.float32
            for j in range(layer.num_outputs):
                layer.set_output_type(j, trt.float32)
            pinned += 1
    return pinned


def build_engine(onnx_path: Path, engine_path: Path, fp16: bool = True, opt_batches: tuple[int, ...] = (1, 32),
                 max_batch: int = 64, timing_cache: Path | None = None, workspace_gib: float = 2.0) -> EngineInfo:
    """Build a TensorRT engine from a bundle ONNX; writes the .plan and its .json sidecar atomically."""
    trt = _import_trt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(onnx_path).read_bytes()):
        errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise TensorRTError(f"{onnx_path}: TensorRT cannot parse the ONNX ({errs[:300]})")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if fp16:
        if not builder.platform_has_fast_fp16:
            raise TensorRTError("this GPU has no fast FP16; build with --precision fp32")
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        _pin_fp32(network, trt)
    inp = network.get_input(0)
    size = int(inp.shape[-1])
    # One profile per expected batch: opt at 1 for the viewer, at the scan batch for dermscan.
    for opt in opt_batches:
        prof = builder.create_optimization_profile()
        prof.set_shape(inp.name, (1, 3, size, size), (min(opt, max_batch), 3, size, size), (max_batch, 3, size, size))
        config.add_optimization_profile(prof)
    cache = None
    if timing_cache is not None:
        blob = timing_cache.read_bytes() if timing_cache.is_file() else b""
        cache = config.create_timing_cache(blob)
        config.set_timing_cache(cache, ignore_mismatch=False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise TensorRTError(f"{onnx_path}: TensorRT engine build failed (see the TensorRT log above)")
    info = expected_info(Path(onnx_path), "fp16" if fp16 else "fp32", tuple(opt_batches), max_batch, size)
    with atomic_path(engine_path) as tmp:
        tmp.write_bytes(bytes(plan))
    write_json(Path(str(engine_path) + ".json"), asdict(info))
    if cache is not None:
        with atomic_path(timing_cache) as tmp:
            tmp.write_bytes(bytes(config.get_timing_cache().serialize()))
    return info


def read_info(engine_path: Path) -> EngineInfo:
    side = Path(str(engine_path) + ".json")
    if not side.is_file():
        raise TensorRTError(f"{engine_path}: no sidecar {side.name}; rebuild it with dermconvert")
    d = json.loads(side.read_text())
    d["opt_batches"] = tuple(d["opt_batches"])
    return EngineInfo(**d)


def ensure_engine(onnx_path: Path, engine_path: Path | None = None, rebuild: bool = True, **build_kw) -> Path:
    """The engine for this ONNX on this GPU and TensorRT: reused when its sidecar matches, else rebuilt (or an
    error saying exactly what differs)."""
    onnx_path = Path(onnx_path)
    engine_path = Path(engine_path) if engine_path else cached_engine_path(onnx_path)
    if engine_path.is_file():
        have = read_info(engine_path)
        want = expected_info(onnx_path, have.precision, have.opt_batches, have.max_batch, have.input_size)
        why = have.mismatch(want)
        if why is None:
            return engine_path
        if not rebuild:
            raise TensorRTError(f"{engine_path}: cannot be used here: {why}")
    build_engine(onnx_path, engine_path, **build_kw)
    return engine_path


class TrtEngine(Engine):
    """Runs a TensorRT engine; the bundle metadata comes from the ONNX it was built from."""

    def __init__(self, onnx_path: str | os.PathLike, engine_path: str | os.PathLike | None = None,
                 rebuild: bool = True):
        trt = _import_trt()
        self.cudart = _import_cudart()
        self.onnx_path = Path(onnx_path)
        self.bundle: ModelBundle = read_bundle_onnx(self.onnx_path)
        self.engine_path = ensure_engine(self.onnx_path, engine_path, rebuild)
        self.info = read_info(self.engine_path)
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
        if self.engine is None:
            raise TensorRTError(f"{self.engine_path}: TensorRT could not deserialize the engine")
        self.max_batch = self.info.max_batch
        self.backend = f"tensorrt:{self.info.precision}"
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_name = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self.output_names = [n for n in names if n != self.input_name]
        self.stream = _check(self.cudart.cudaStreamCreate())
        s = self.info.input_size
        # One execution context per optimisation profile, each with buffers for the largest batch.
        self.contexts = []
        for p in range(self.engine.num_optimization_profiles):
            ctx = self.engine.create_execution_context()
            ctx.set_optimization_profile_async(p, self.stream)
            ctx.set_input_shape(self.input_name, (self.max_batch, 3, s, s))
            bufs = {}
            for n in names:
                shape = tuple(ctx.get_tensor_shape(n))
                dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(n)))
                nbytes = int(np.prod(shape)) * dtype.itemsize
                bufs[n] = (_check(self.cudart.cudaMalloc(nbytes)), dtype)
                ctx.set_tensor_address(n, int(bufs[n][0]))
            self.contexts.append((ctx, bufs))

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        cudart = self.cudart
        n = len(batch)
        opts = self.info.opt_batches
        p = min(range(len(opts)), key=lambda i: abs(opts[i] - n))
        ctx, bufs = self.contexts[p]
        x = np.ascontiguousarray(batch, dtype=bufs[self.input_name][1])
        ctx.set_input_shape(self.input_name, x.shape)
        _check(cudart.cudaMemcpyAsync(bufs[self.input_name][0], x.ctypes.data, x.nbytes,
                                      cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, self.stream))
        if not ctx.execute_async_v3(self.stream):
            raise TensorRTError(f"{self.engine_path}: inference failed")
        outs = {}
        for name in self.output_names:
            ptr, dtype = bufs[name]
            host = np.empty(tuple(ctx.get_tensor_shape(name)), dtype=dtype)
            _check(cudart.cudaMemcpyAsync(host.ctypes.data, ptr, host.nbytes,
                                          cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.stream))
            outs[name] = host
        _check(cudart.cudaStreamSynchronize(self.stream))
        return outs["logits"].astype(np.float32), outs.get("cam")

    def close(self) -> None:
        for _ctx, bufs in getattr(self, "contexts", []):
            for ptr, _ in bufs.values():
                self.cudart.cudaFree(ptr)
        self.contexts = []

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def read_bundle_onnx(onnx_path: Path) -> ModelBundle:
    """The bundle metadata of an ONNX file, read without building an inference session."""
    import onnxruntime as ort

    if not Path(onnx_path).is_file():
        raise BundleError(f"{onnx_path}: model file not found")
    try:
        sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001
        raise BundleError(f"{onnx_path}: not a loadable ONNX model ({str(e).splitlines()[0][:200]})") from None
    return from_metadata(sess.get_modelmeta().custom_metadata_map, str(onnx_path))
