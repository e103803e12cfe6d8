"""TensorRT backend: a strongly typed engine built from the gated ONNX file of its precision (`M.onnx`,
`M.fp16.onnx`, `M.int8.onnx`), cached per GPU and TensorRT version, run with cuda-python.

The same code builds on TensorRT 10.x (JetPack 6 ships 10.3) and 11.x (which builds strongly typed networks only).
Precision is never chosen here: every tensor's type comes from the ONNX file, whose accuracy `dermconvert`'s gate
measured, so what the gate measured is what runs. No builder precision flag, no per-layer precision.

`tensorrt` and `cuda-python` are optional (extras in packaging/README.md); without them `trt_unavailable()` says
why in one line and the runtime falls back to ONNX Runtime. Any exception TensorRT or CUDA raises while building
or loading becomes a one-line TensorRTError, so `--backend auto` always falls back instead of dying.
"""
from __future__ import annotations

import ctypes
import json
import os
import platform
import re
import sys
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from engines.bundle import BundleError, ModelBundle, from_metadata
from engines.engine import Engine
from engines.errors import one_line
from engines.fsutil import atomic_path, sha256_file, write_json

SUPPORTED_MAJORS = (10, 11)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr)


class TensorRTError(Exception):
    """TensorRT cannot build or run this engine here; str() is one line."""


def _import_trt():
    try:
        import tensorrt as trt
    except ImportError:
        raise TensorRTError("TensorRT is not installed (see packaging/README.md, 'TensorRT')") from None
    except Exception as e:  # noqa: BLE001 - a wheel without NVIDIA's libraries fails with OSError and others
        raise TensorRTError(f"TensorRT does not load here ({one_line(e)})") from None
    major = int(str(trt.__version__).split(".")[0])
    if major not in SUPPORTED_MAJORS:
        raise TensorRTError(f"TensorRT {trt.__version__} is not supported: DermEdge builds on TensorRT 10.x and 11.x")
    return trt


def _import_cudart():
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python 12.x
        except ImportError:
            raise TensorRTError("cuda-python is not installed (see packaging/README.md, 'TensorRT')") from None
    return cudart


def _check(result):
    """cuda-python calls return (err, *values); raise on error, return the values."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        hint = " (the NVIDIA driver is older than this cuda-python needs: JetPack 6 needs cuda-python 12.x)" \
            if "InsufficientDriver" in str(err) else ""
        raise TensorRTError(f"CUDA error {err}{hint}")
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
        return f"no usable CUDA driver ({one_line(e)})"
    return None if count > 0 else "no NVIDIA GPU found"


@dataclass(frozen=True)
class Gpu:
    """What makes an engine or a timing cache specific to one GPU: every Orin module reports the same name, so the
    SM count and memory size tell them apart."""
    name: str
    compute_capability: str
    sm_count: int
    memory_mib: int

    @property
    def key(self) -> str:
        name = re.sub(r"[^A-Za-z0-9.-]+", "_", self.name).strip("_")
        return f"{name}-sm{self.compute_capability.replace('.', '')}-{self.sm_count}sms-{self.memory_mib}MiB"


def this_gpu() -> Gpu:
    cudart = _import_cudart()
    dev = _check(cudart.cudaGetDevice())
    props = _check(cudart.cudaGetDeviceProperties(dev))
    name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
    return Gpu(name.strip("\x00 "), f"{props.major}.{props.minor}", int(props.multiProcessorCount),
               int(props.totalGlobalMem) >> 20)


@dataclass(frozen=True)
class EngineInfo:
    """The JSON sidecar of an engine: what it was built from and for."""
    tensorrt_version: str
    gpu: str  # Gpu.key
    onnx_sha256: str
    precision: str  # of the ONNX file it was built from (its bundle metadata)
    opt_batch: int
    max_batch: int
    input_size: int
    host: str = ""

    def mismatch(self, other: "EngineInfo") -> str | None:
        for field in ("tensorrt_version", "gpu", "onnx_sha256", "precision", "input_size"):
            a, b = getattr(self, field), getattr(other, field)
            if a != b:
                return f"{field} is {a!r} in the engine, {b!r} here"
        if self.max_batch < other.max_batch:
            return f"its largest batch is {self.max_batch}, {other.max_batch} is needed"
        return None


def engine_cache_dir() -> Path:
    base = os.environ.get("DERMEDGE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "dermedge")
    return Path(base) / "engines"


def timing_cache_path() -> Path:
    """One timing cache per (TensorRT version, GPU): a cache from another one breaks or slows a build."""
    trt = _import_trt()
    return engine_cache_dir() / f"timing-trt{trt.__version__}-{this_gpu().key}.cache"


def cached_engine_path(onnx_path: Path, max_batch: int = 1) -> Path:
    """One engine per (ONNX content, TensorRT version, GPU, largest batch): never mixed."""
    trt = _import_trt()
    key = f"{sha256_file(onnx_path)[:16]}-trt{trt.__version__}-{this_gpu().key}-b{max_batch}"
    return engine_cache_dir() / f"{Path(onnx_path).stem}-{key}.plan"


def expected_info(onnx_path: Path, bundle: ModelBundle, opt_batch: int, max_batch: int) -> EngineInfo:
    trt = _import_trt()
    return EngineInfo(trt.__version__, this_gpu().key, sha256_file(onnx_path), bundle.precision, opt_batch,
                      max_batch, bundle.preprocess.size, platform.node())


def _load_timing_cache(config, path: Path | None, log) -> object | None:
    if path is None:
        return None
    blob = path.read_bytes() if path.is_file() else b""
    try:
        cache = config.create_timing_cache(blob)
        if config.set_timing_cache(cache, False) is False:
            raise TensorRTError("rejected")
        return cache
    except Exception as e:  # noqa: BLE001 - a damaged or foreign cache only costs build time
        log(f"timing cache {path} not usable ({one_line(e)}): starting a new one")
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, False)
        return cache


def build_engine(onnx_path: Path, engine_path: Path, max_batch: int = 1, opt_batch: int | None = None,
                 timing_cache: Path | None = None, workspace_gib: float = 1.0, log=_log) -> EngineInfo:
    """A strongly typed engine for batches 1..max_batch (tuned for opt_batch, default max_batch) from a bundle
    ONNX of any precision; writes the .plan and its .json sidecar atomically."""
    try:
        return _build(Path(onnx_path), Path(engine_path), max_batch, opt_batch or max_batch, timing_cache,
                      workspace_gib, log)
    except (TensorRTError, BundleError):
        raise
    except Exception as e:  # noqa: BLE001 - TensorRT raises RuntimeError, TypeError, AttributeError, ...
        raise TensorRTError(f"{onnx_path}: TensorRT engine build failed ({one_line(e)})") from None


def _build(onnx_path: Path, engine_path: Path, max_batch: int, opt_batch: int, timing_cache: Path | None,
           workspace_gib: float, log) -> EngineInfo:
    trt = _import_trt()
    bundle = read_bundle_onnx(onnx_path)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise TensorRTError(f"{onnx_path}: TensorRT cannot parse the ONNX ({' '.join(errs.split())[:300]})")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    inp = network.get_input(0)
    s = bundle.preprocess.size
    profile = builder.create_optimization_profile()
    profile.set_shape(inp.name, (1, 3, s, s), (min(opt_batch, max_batch), 3, s, s), (max_batch, 3, s, s))
    config.add_optimization_profile(profile)
    cache = _load_timing_cache(config, timing_cache, log)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise TensorRTError(f"{onnx_path}: TensorRT engine build failed (see the TensorRT log above)")
    info = expected_info(onnx_path, bundle, min(opt_batch, max_batch), max_batch)
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
    try:
        return EngineInfo(**json.loads(side.read_text()))
    except (ValueError, TypeError) as e:
        raise TensorRTError(f"{side}: not an engine sidecar of this DermEdge version ({one_line(e)})") from None


def ensure_engine(onnx_path: Path, engine_path: Path | None = None, rebuild: bool = True, max_batch: int = 1,
                  log=_log) -> Path:
    """The engine for this ONNX, GPU, TensorRT and batch size: reused when its sidecar matches, else rebuilt (or
    an error saying exactly what differs)."""
    onnx_path = Path(onnx_path)
    engine_path = Path(engine_path) if engine_path else cached_engine_path(onnx_path, max_batch)
    if engine_path.is_file():
        have = read_info(engine_path)
        why = have.mismatch(expected_info(onnx_path, read_bundle_onnx(onnx_path), have.opt_batch, max_batch))
        if why is None:
            return engine_path
        if not rebuild:
            raise TensorRTError(f"{engine_path}: cannot be used here: {why}")
    if not rebuild:
        raise TensorRTError(f"{engine_path}: no such engine")
    log(f"building a TensorRT engine for {onnx_path.name} (batch <= {max_batch}); minutes on a Jetson, once")
    build_engine(onnx_path, engine_path, max_batch=max_batch, timing_cache=timing_cache_path(), log=log)
    return engine_path


class _Pinned:
    """Page-locked host memory as a numpy array (NVIDIA's samples copy through cudaMallocHost buffers)."""

    def __init__(self, cudart, shape: tuple[int, ...], dtype: np.dtype):
        self.cudart = cudart
        nbytes = max(int(np.prod(shape)) * dtype.itemsize, 1)
        self.ptr = int(_check(cudart.cudaMallocHost(nbytes)))
        raw = (ctypes.c_byte * nbytes).from_address(self.ptr)
        self.array = np.frombuffer(raw, dtype=dtype, count=int(np.prod(shape))).reshape(shape)

    def free(self) -> None:
        if self.ptr:
            self.cudart.cudaFreeHost(self.ptr)
            self.ptr = 0


@dataclass
class _Tensor:
    name: str
    dtype: np.dtype
    device: int  # device pointer
    host: _Pinned


class TrtEngine(Engine):
    """Runs a TensorRT engine built from `onnx_path` (whose bundle metadata it uses). One execution context
    with buffers for `max_batch` images: the viewer asks for 1, dermscan for its batch."""

    def __init__(self, onnx_path: str | os.PathLike, engine_path: str | os.PathLike | None = None,
                 rebuild: bool = True, max_batch: int = 1, log=_log):
        self.onnx_path = Path(onnx_path)
        self._lock = threading.Lock()  # run() and close() never overlap (the viewer closes from the UI thread)
        self._tensors: list[_Tensor] = []
        self.stream = None
        try:
            self._open(engine_path, rebuild, max(1, int(max_batch)), log)
        except (TensorRTError, BundleError):
            self.close()
            raise
        except Exception as e:  # noqa: BLE001 - TensorRT and CUDA raise RuntimeError, TypeError, AttributeError...
            self.close()
            raise TensorRTError(f"{self.onnx_path}: TensorRT cannot run this model ({one_line(e)})") from None

    def _open(self, engine_path, rebuild: bool, max_batch: int, log) -> None:
        trt = _import_trt()
        self.cudart = _import_cudart()
        self.bundle: ModelBundle = read_bundle_onnx(self.onnx_path)
        self.engine_path = ensure_engine(self.onnx_path, engine_path, rebuild, max_batch, log)
        self.info = read_info(self.engine_path)
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
        if self.engine is None:
            raise TensorRTError(f"{self.engine_path}: TensorRT could not deserialize the engine")
        self.max_batch = max_batch
        self.backend = f"tensorrt:{self.info.precision}"
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        if len(inputs) != 1:
            raise TensorRTError(f"{self.engine_path}: expected one input tensor, found {len(inputs)}")
        self.input_name = inputs[0]
        self.stream = _check(self.cudart.cudaStreamCreate())
        self.context = self.engine.create_execution_context()
        s = self.info.input_size
        self.context.set_input_shape(self.input_name, (max_batch, 3, s, s))
        for n in names:
            shape = tuple(self.context.get_tensor_shape(n))
            dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(n)))
            host = _Pinned(self.cudart, shape, dtype)
            device = int(_check(self.cudart.cudaMalloc(host.array.nbytes)))
            self._tensors.append(_Tensor(n, dtype, device, host))
            self.context.set_tensor_address(n, device)

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        with self._lock:
            if not self._tensors:
                raise TensorRTError(f"{self.onnx_path}: the TensorRT engine is closed")
            return self._run(batch)

    def _run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        cudart = self.cudart
        n = len(batch)
        if n > self.max_batch:
            raise TensorRTError(f"batch of {n} exceeds this engine's {self.max_batch}")
        src = next(t for t in self._tensors if t.name == self.input_name)
        staged = src.host.array[:n]
        staged[...] = batch  # casts to the engine's input type
        self.context.set_input_shape(self.input_name, staged.shape)
        _check(cudart.cudaMemcpyAsync(src.device, src.host.ptr, staged.nbytes,
                                      cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, self.stream))
        if not self.context.execute_async_v3(self.stream):
            raise TensorRTError(f"{self.engine_path}: inference failed")
        outs = {}
        for t in self._tensors:
            if t.name == self.input_name:
                continue
            shape = tuple(self.context.get_tensor_shape(t.name))
            host = t.host.array.reshape(-1)[:int(np.prod(shape))].reshape(shape)
            _check(cudart.cudaMemcpyAsync(t.host.ptr, t.device, host.nbytes,
                                          cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.stream))
            outs[t.name] = host
        _check(cudart.cudaStreamSynchronize(self.stream))
        cam = outs.get("cam")
        return outs["logits"].astype(np.float32), None if cam is None else cam.astype(np.float32)

    def close(self) -> None:
        with self._lock:
            for t in self._tensors:
                self.cudart.cudaFree(t.device)
                t.host.free()
            self._tensors = []
            if self.stream is not None:
                self.cudart.cudaStreamDestroy(self.stream)
                self.stream = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def read_bundle_onnx(onnx_path: Path) -> ModelBundle:
    """The bundle metadata of an ONNX file (ONNX Runtime reads it; no inference session is run)."""
    from engines.onnx_backend import import_ort

    ort = import_ort()

    if not Path(onnx_path).is_file():
        raise BundleError(f"{onnx_path}: model file not found")
    try:
        sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001
        raise BundleError(f"{onnx_path}: not a loadable ONNX model ({str(e).splitlines()[0][:200]})") from None
    return from_metadata(sess.get_modelmeta().custom_metadata_map, str(onnx_path))
