"""INT8 ONNX: QDQ with per-channel symmetric INT8 weights, calibrated on training images with ONNX Runtime's
quantization tools, then bias-corrected.

Activations are unsigned (UINT8 with zero points) by default: ONNX Runtime's CPU kernels then fold each ReLU6 into
the quantization range, 3.2x FP32 on the shipped Lite0 here. TensorRT takes only signed symmetric INT8 (zero point
0); `signed=True` writes that form, which keeps every Clip as a float step on ONNX Runtime CPU (0.83x FP32 here).

Why the correction: rounding the BatchNorm-folded weights of the early, high-resolution layers shifts the mean of
their outputs, and the shift grows through the network. On the shipped Lite0 plain post-training quantization keeps
about 90% top-1 agreement with FP32 while 5% of validation images have a top-2 logit margin under 0.12. Setting each
convolution's bias so that its per-channel mean output over the calibration images equals the FP32 model's (layer
by layer, in graph order, so each correction sees the corrected layers before it) removes that shift.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from dermconvert.graph import fold_dynamic_pads, probe_session
from engines.bundle import ModelBundle
from engines.errors import one_line
from engines.fsutil import atomic_path

CORRECTION_IMAGES = 64  # of the calibration images: enough for per-channel means, and 50 passes stay short


@dataclass
class Int8Info:
    calibration_images: int
    quantized_nodes: int
    bias_corrected: int
    shift_before: float  # mean |per-channel output shift| of the corrected convolutions, plain quantization
    shift_after: float  # the same after bias correction


class _Reader:
    """CalibrationDataReader over a preprocessed batch."""

    def __init__(self, name: str, x: np.ndarray, batch: int = 32):
        self.name, self.x, self.batch, self.i = name, x, batch, 0

    def get_next(self):
        if self.i >= len(self.x):
            return None
        b = np.ascontiguousarray(self.x[self.i:self.i + self.batch], np.float32)
        self.i += self.batch
        return {self.name: b}

    def rewind(self):
        self.i = 0


def _clips(fmodel) -> dict[str, tuple[str, float, float]]:
    """Clip (ReLU6) output -> (its input, min, max), for Clips with constant bounds."""
    from onnx import numpy_helper

    consts = {t.name: numpy_helper.to_array(t) for t in fmodel.graph.initializer}
    consts.update({n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in fmodel.graph.node
                   if n.op_type == "Constant" and n.attribute})
    return {n.output[0]: (n.input[0], float(consts[n.input[1]]), float(consts[n.input[2]]))
            for n in fmodel.graph.node
            if n.op_type == "Clip" and len(n.input) == 3 and n.input[1] in consts and n.input[2] in consts}


def _reference(qname: str, clips: dict) -> tuple[str, tuple[float, float]]:
    """The FP32 tensor a quantized convolution's output is compared with, and the range that counts. A mean shift
    in what an activation cuts off changes nothing, so only FP32 values inside a following Clip's range count.
    The quantizer renames a convolution that feeds a graph output NAME_QuantizeLinear_Input, and with unsigned
    activations it drops the Clip after a convolution, whose output then takes the Clip's name."""
    name = qname.removesuffix("_QuantizeLinear_Input")
    if name in clips:  # the Clip was folded into the quantization range
        src, lo, hi = clips[name]
        return src, (lo, hi)
    following = next(((lo, hi) for out, (src, lo, hi) in clips.items() if src == name), (-np.inf, np.inf))
    return name, following


@dataclass
class _Reference:
    """The FP32 model's output of one convolution over the correction images, as bias correction needs it: per
    channel, the sum and number of the values inside the range that counts, and per batch where they lie (None:
    everywhere). Kept so the FP32 model runs once, not again for each of ~50 convolutions."""
    sums: np.ndarray
    counts: np.ndarray
    masks: list[np.ndarray | None]


def _channel_axes(ndim: int) -> tuple[int, ...]:
    return (0, *range(2, ndim))


def _references(fmodel, convs: list, x: np.ndarray, batch: int = 32) -> list[_Reference]:
    """The FP32 reference of each of `convs` (from _biased_convs) on `x`, in one pass of the FP32 model."""
    if not convs:
        return []
    names = [fname for _, _, fname, _ in convs]
    fsess = probe_session(fmodel, names)
    inp = fsess.get_inputs()[0].name
    sums, counts, masks = [0.0] * len(names), [0.0] * len(names), [[] for _ in names]
    for i in range(0, len(x), batch):
        outs = fsess.run(names, {inp: np.ascontiguousarray(x[i:i + batch], np.float32)})
        for k, (f, (_, _, _, (lo, hi))) in enumerate(zip(outs, convs)):
            f = f.astype(np.float64)
            keep = (f > lo) & (f < hi)
            axes = _channel_axes(f.ndim)
            sums[k] = sums[k] + np.where(keep, f, 0.0).sum(axis=axes)
            counts[k] = counts[k] + keep.sum(axis=axes)
            masks[k].append(None if keep.all() else keep)
    return [_Reference(np.asarray(s), np.asarray(c), m) for s, c, m in zip(sums, counts, masks)]


def _mean_errors(qsess, names: list[str], refs: list[_Reference], x: np.ndarray, batch: int = 32,
                 feeds: dict[str, np.ndarray] | None = None) -> list[np.ndarray]:
    """For each quantized output and its FP32 reference: the per-channel mean of (quantized - float) over the
    positions where the float output lies in the range that counts. `feeds`: the graph's other inputs."""
    inp = qsess.get_inputs()[0].name
    totals = [0.0] * len(names)
    for b, i in enumerate(range(0, len(x), batch)):
        outs = qsess.run(names, {inp: np.ascontiguousarray(x[i:i + batch], np.float32), **(feeds or {})})
        for k, (q, ref) in enumerate(zip(outs, refs)):
            q = q.astype(np.float64)
            mask = ref.masks[b]
            totals[k] = totals[k] + (q if mask is None else np.where(mask, q, 0.0)).sum(axis=_channel_axes(q.ndim))
    return [np.where(r.counts > 0, (t - r.sums) / np.maximum(r.counts, 1), 0.0) for t, r in zip(totals, refs)]


def _biased_convs(qmodel, fmodel) -> list[tuple[object, object, str, tuple[float, float]]]:
    """(Conv node, the DequantizeLinear of its quantized bias, FP32 reference tensor, range that counts) for every
    convolution whose bias bias correction can set, in graph order."""
    inits = {t.name for t in qmodel.graph.initializer}
    producer = {o: n for n in qmodel.graph.node for o in n.output}
    clips = _clips(fmodel)
    convs = []
    for node in qmodel.graph.node:
        dq = producer.get(node.input[2]) if node.op_type == "Conv" and len(node.input) > 2 else None
        if dq is not None and dq.op_type == "DequantizeLinear" and dq.input[0] in inits:
            convs.append((node, dq, *_reference(node.output[0], clips)))
    return convs


def output_shift(qmodel, convs: list, refs: list[_Reference], x: np.ndarray) -> float:
    """Mean over the bias-carrying convolutions `convs` of their mean absolute per-channel output shift from their
    FP32 references on `x`: what bias correction removes (see the module docstring), with every layer as it stands."""
    if not convs:
        return 0.0
    qnames = [node.output[0] for node, *_ in convs]
    shifts = _mean_errors(probe_session(qmodel, qnames), qnames, refs, x)
    return float(np.mean([np.abs(s).mean() for s in shifts]))


def correct_biases(qmodel, convs: list, refs: list[_Reference], x: np.ndarray, log=print) -> int:
    """Empirical bias correction of each of `convs`, one at a time in graph order, towards its FP32 reference on `x`
    (see the module docstring); `qmodel` is changed in place."""
    from onnx import numpy_helper

    inits = {t.name: t for t in qmodel.graph.initializer}
    biases = {dq.input[0]: numpy_helper.to_array(inits[dq.input[0]]) for _, dq, _, _ in convs}
    qsess = probe_session(_with_inputs(qmodel, biases), [node.output[0] for node, *_ in convs])
    for (node, dq, _, _), ref in tqdm(list(zip(convs, refs)), desc="bias correction", unit="conv", leave=False):
        shift = _mean_errors(qsess, [node.output[0]], [ref], x, feeds=biases)[0]
        name = dq.input[0]
        scale = numpy_helper.to_array(inits[dq.input[1]]).astype(np.float64)
        b = biases[name].astype(np.float64) * scale - shift
        biases[name] = np.clip(np.round(b / scale), -2**31, 2**31 - 1).astype(np.int32)
        inits[name].CopyFrom(numpy_helper.from_array(biases[name], name))
    log(f"bias correction: {len(convs)} convolutions on {len(x)} calibration images")
    return len(convs)


def _with_inputs(model, tensors: dict[str, np.ndarray]):
    """A copy of `model` whose initializers `tensors` are graph inputs instead: one session then serves every
    correction step, each fed the biases as they stand, where a new session per step had to be built."""
    import onnx
    from onnx import helper

    out = onnx.ModelProto()
    out.CopyFrom(model)
    kept = [t for t in out.graph.initializer if t.name not in tensors]
    del out.graph.initializer[:]
    out.graph.initializer.extend(kept)
    out.graph.input.extend(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
                           for name, a in tensors.items())
    return out


def _quantize(src: Path, calib: np.ndarray, size: int, signed: bool):
    """(the pre-processed FP32 graph, its QDQ version) before bias correction.

    The ONNX Runtime form (unsigned activations) keeps its weights to 7 bits: on an x86 CPU without VNNI (AVX2, as
    many clinic PCs are) ONNX Runtime multiplies u8 by s8 with an instruction that saturates the sum of each pair
    of products in 16 bits, which full 8-bit weights overflow: the shipped Lite0 kept 79% top-1 agreement with FP32
    on an AVX2 CPU with 8-bit weights, 96% with 7-bit ones (docs/int8.md), which no CPU saturates, so the gate
    measures what every CPU runs. The signed form is for TensorRT, whose kernels do not saturate: it keeps 8 bits."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as tmp:
        folded, pre, raw = Path(tmp) / "folded.onnx", Path(tmp) / "pre.onnx", Path(tmp) / "qdq.onnx"
        onnx.save(fold_dynamic_pads(onnx.load(str(src)), size), str(folded))
        quant_pre_process(str(folded), str(pre), skip_symbolic_shape=False)
        fmodel = onnx.load(str(pre))
        quantize_static(str(pre), str(raw), _Reader(fmodel.graph.input[0].name, calib),
                        quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8 if signed else QuantType.QUInt8,
                        weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
                        reduce_range=not signed,
                        extra_options={"ActivationSymmetric": signed, "WeightSymmetric": True})
        qmodel = onnx.load(str(raw))
    return fmodel, qmodel


def quantize_int8(src: Path, dst: Path, calib: np.ndarray, bundle: ModelBundle, log=print,
                  signed: bool = False) -> tuple[ModelBundle, Int8Info]:
    """FP32 bundle `src` -> INT8 QDQ bundle `dst` (complete or absent), calibrated on `calib` (preprocessed)."""
    import onnx

    from dermconvert.export import ConvertError, set_metadata

    try:
        fmodel, qmodel = _quantize(src, calib, bundle.preprocess.size, signed)
    except Exception as e:  # noqa: BLE001 - the quantizer raises many types on a graph it cannot handle
        raise ConvertError(f"{src}: INT8 quantization failed ({one_line(e)})") from None
    x = calib[:CORRECTION_IMAGES]
    convs = _biased_convs(qmodel, fmodel)
    refs = _references(fmodel, convs, x)
    before = output_shift(qmodel, convs, refs, x)
    corrected = correct_biases(qmodel, convs, refs, x, log)
    after = output_shift(qmodel, convs, refs, x)
    log(f"mean |output shift| per convolution: {before:.2e} before bias correction, {after:.2e} after")
    out_bundle = ModelBundle(**{**bundle.__dict__, "precision": "int8"})
    set_metadata(qmodel, out_bundle)
    onnx.checker.check_model(qmodel)
    with atomic_path(dst) as tmp_path:
        onnx.save(qmodel, str(tmp_path))
    n_q = sum(n.op_type == "QuantizeLinear" for n in qmodel.graph.node)
    return out_bundle, Int8Info(len(calib), n_q, corrected, before, after)
