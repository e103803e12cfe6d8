"""Several FP32 bundles -> one ensemble bundle: one ONNX graph that runs every member and averages their calibrated
log-probabilities, with its own temperature and melanoma thresholds fitted on validation.

The ensemble is an ordinary bundle, so everything downstream takes it unchanged: dermscan, the viewer, the FP16
gate, a TensorRT engine. Its input is the largest member's; each smaller member gets the image resized inside the
graph (linear, half-pixel, as OpenCV does), which is not bit for bit the member's own preprocessing: the report
says how far the ensemble as shipped agrees with the members run on their own inputs, on validation.

    dermconvert ensemble engines/models/efficientnet_lite0.onnx build/models/lite1-bank.onnx \
        build/models/lite2-bank.onnx --onnx build/models/teachers3.onnx --data $DERM_DATA --split S --fp16
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dermconvert.export import OPSET, ConvertError, set_metadata
from engines.bundle import ModelBundle
from engines.fsutil import atomic_path

INPUT = "input"


@dataclass(frozen=True)
class Member:
    path: Path
    bundle: ModelBundle
    cam_hw: tuple[int, int] | None  # the member's activation-map grid, None without one


def load_members(paths: list[Path]) -> list[Member]:
    """Each member opened on ONNX Runtime (which checks its bundle and outputs); refused unless they can be one
    model: two or more FP32 bundles of one resize policy, fitted on one split."""
    from engines.onnx_backend import OrtEngine

    if len(paths) < 2:
        raise ConvertError("an ensemble needs at least two member models")
    members = []
    for p in paths:
        eng = OrtEngine(p, "cpu")
        b = eng.bundle
        if b.precision != "fp32":
            raise ConvertError(f"{p}: a {b.precision} bundle; an ensemble is built from FP32 members "
                               "(its own FP16 file is derived and gated afterwards)")
        cam_hw = None
        if b.has_cam:
            _, cam = eng.run(np.zeros((1, 3, b.preprocess.size, b.preprocess.size), np.float32))
            cam_hw = tuple(int(d) for d in cam.shape[2:])
        members.append(Member(Path(p), b, cam_hw))
    first = members[0]
    for m in members[1:]:
        if m.bundle.preprocess.resize != first.bundle.preprocess.resize:
            raise ConvertError(f"{m.path}: resize policy {m.bundle.preprocess.resize!r} differs from "
                               f"{first.path.name}'s {first.bundle.preprocess.resize!r}")
        if m.bundle.split_sha256 != first.bundle.split_sha256:
            raise ConvertError(f"{m.path}: trained on another split than {first.path.name}: a validation image of "
                               "one could be a training image of the other")
    return members


def input_spec(members: list[Member]):
    return max((m.bundle.preprocess for m in members), key=lambda s: s.size)


def ensemble_graph(members: list[Member], with_cam: bool = True):
    """The ModelProto: input N x 3 x S x S preprocessed for the largest member; outputs `logits` (the mean of the
    members' log-softmax at their own temperatures) and, when every member has one, `cam` (their activation maps
    resized to the finest grid and averaged with the same weights: a log-softmax only subtracts a constant per
    image, so the maps still say what each place adds)."""
    import onnx
    from onnx import TensorProto, compose, helper, numpy_helper

    spec = input_spec(members)
    n = len(members)
    with_cam = with_cam and all(m.cam_hw for m in members)
    cam_hw = max((m.cam_hw for m in members), key=lambda hw: hw[0] * hw[1]) if with_cam else None
    nodes, inits, value_info = [], [], []

    def const(name: str, arr: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(arr, name))
        return name

    def resized(x: str, hw: tuple[int, int], name: str) -> str:
        """`x` (N x C x h x w) resized to hw, N and C taken from x at run time (the batch is dynamic)."""
        nodes.append(helper.make_node("Shape", [x], [f"{name}/shape"], end=2))
        nodes.append(helper.make_node("Concat", [f"{name}/shape", const(f"{name}/hw", np.array(hw, np.int64))],
                                      [f"{name}/sizes"], axis=0))
        nodes.append(helper.make_node("Resize", [x, "", "", f"{name}/sizes"], [name], mode="linear",
                                      coordinate_transformation_mode="half_pixel"))
        return name

    logps, cams = [], []
    for i, m in enumerate(members):
        p = f"m{i}/"
        proto = compose.add_prefix(onnx.load(str(m.path)), p)
        x = INPUT
        mine = m.bundle.preprocess
        if (mine.mean, mine.std) != (spec.mean, spec.std):  # undo the ensemble's normalisation, apply the member's
            s_in, m_in = np.array(spec.std, np.float32), np.array(spec.mean, np.float32)
            s_m, m_m = np.array(mine.std, np.float32), np.array(mine.mean, np.float32)
            nodes.append(helper.make_node("Mul", [x, const(f"{p}norm/scale", (s_in / s_m).reshape(1, 3, 1, 1))],
                                          [f"{p}norm/scaled"]))
            nodes.append(helper.make_node("Add", [f"{p}norm/scaled",
                                                  const(f"{p}norm/bias", ((m_in - m_m) / s_m).reshape(1, 3, 1, 1))],
                                          [f"{p}normalized"]))
            x = f"{p}normalized"
        if mine.size != spec.size:
            x = resized(x, (mine.size, mine.size), f"{p}resized")
        g = proto.graph
        for node in g.node:
            node.input[:] = [x if name == p + INPUT else name for name in node.input]
        nodes.extend(g.node)
        inits.extend(g.initializer)
        value_info.extend(g.value_info)
        nodes.append(helper.make_node("Mul", [p + "logits", const(f"{p}inv_t", np.float32(1 / m.bundle.temperature))],
                                      [f"{p}scaled"]))
        nodes.append(helper.make_node("LogSoftmax", [f"{p}scaled"], [f"{p}logp"], axis=1))
        logps.append(f"{p}logp")
        if with_cam:
            cam = p + "cam" if m.cam_hw == cam_hw else resized(p + "cam", cam_hw, f"{p}cam_resized")
            weight = np.float32(1 / (n * m.bundle.temperature))
            nodes.append(helper.make_node("Mul", [cam, const(f"{p}cam_w", weight)], [f"{p}cam_weighted"]))
            cams.append(f"{p}cam_weighted")
    nodes.append(helper.make_node("Sum", logps, ["ens/logp_sum"]))
    nodes.append(helper.make_node("Mul", ["ens/logp_sum", const("ens/inv_n", np.float32(1 / n))], ["logits"]))
    k = len(members[0].bundle.classes)
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", k])]
    if with_cam:
        nodes.append(helper.make_node("Sum", cams, ["cam"]))
        outputs.append(helper.make_tensor_value_info("cam", TensorProto.FLOAT, ["batch", k, *cam_hw]))
    graph = helper.make_graph(nodes, "dermedge_ensemble",
                              [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["batch", 3, spec.size, spec.size])],
                              outputs, inits, value_info=value_info)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


def ensemble_bundle(members: list[Member], has_cam: bool) -> ModelBundle:
    """The metadata before calibration (temperature 1): what the graph is made of."""
    return ModelBundle(model_name="ensemble(" + " + ".join(f"{m.bundle.model_name}@{m.bundle.preprocess.size}"
                                                           for m in members) + ")",
                       preprocess=input_spec(members), split_sha256=members[0].bundle.split_sha256,
                       has_cam=has_cam, precision="fp32", source=" + ".join(m.path.name for m in members))


def log_probs(logits: np.ndarray, temperature: float) -> np.ndarray:
    """What an ensemble averages: each member's log-softmax at its own temperature (clipped: log 0 is -inf)."""
    from engines.engine import softmax
    return np.log(np.clip(softmax(logits, temperature), 1e-12, None))


def member_logprobs(members: list[Member], data: Path, split: Path, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    """The reference the graph is compared with: each member on its own preprocessing of the validation images,
    log-softmax at its own temperature, averaged (what bench/ensemble.py scores)."""
    from dermconvert.pipeline import validation_batch
    from engines.onnx_backend import OrtEngine

    out, labels = [], None
    for m in members:
        x, labels = validation_batch(data, split, m.bundle.preprocess, limit, progress=False)
        eng = OrtEngine(m.path, "cpu")
        out.append(log_probs(eng.logits(x)[0], m.bundle.temperature))
    return np.mean(out, axis=0), labels


def calibrate(bundle: ModelBundle, val_logits: dict[str, np.ndarray], labels: np.ndarray, log_prior: np.ndarray,
              target_sensitivity: float = 0.90) -> ModelBundle:
    """Temperature on the plain validation logits, then the melanoma flag at that temperature (convert.flag)."""
    from dataclasses import replace

    from dermconvert.flag import with_flag
    from dermtrain.metrics import fit_temperature

    t = fit_temperature(val_logits["none"], labels)
    return with_flag(replace(bundle, temperature=t), val_logits, labels, log_prior, target_sensitivity)


def build_ensemble(paths: list[Path], out: Path, data: Path, split: Path, limit: int | None = None,
                   with_cam: bool = True, log=print) -> dict:
    """Write the calibrated ensemble bundle to `out` (complete or absent); returns what its report records."""
    import onnx

    from dermconvert.pipeline import validation_batch
    from dermtrain.fit import split_log_prior
    from dermtrain.metrics import balanced_accuracy, confusion
    from engines.onnx_backend import OrtEngine

    members = load_members(paths)
    model = ensemble_graph(members, with_cam)
    has_cam = any(o.name == "cam" for o in model.graph.output)
    bundle = ensemble_bundle(members, has_cam)
    with atomic_path(out) as tmp:
        set_metadata(model, bundle)
        onnx.save(model, str(tmp))
        eng = OrtEngine(tmp, "cpu")
        x, labels = validation_batch(data, split, bundle.preprocess, limit)
        log(f"ensemble of {len(members)}: scoring {len(labels)} validation images, plain and with flips")
        val = {tta: eng.logits(x, tta)[0] for tta in ("none", "flip")}
        bundle = calibrate(bundle, val, labels, split_log_prior(data, split, limit))
        set_metadata(model, bundle)
        onnx.save(model, str(tmp))
    ref, _ = member_logprobs(members, data, split, limit)
    cm_ref, cm_graph = confusion(labels, ref.argmax(1)), confusion(labels, val["none"].argmax(1))
    agreement = {"n": int(len(labels)), "top1_agreement": float((ref.argmax(1) == val["none"].argmax(1)).mean()),
                 "balanced_accuracy_members_own_inputs": balanced_accuracy(cm_ref),
                 "balanced_accuracy_as_shipped": balanced_accuracy(cm_graph),
                 "max_abs_logit_diff": float(np.abs(ref - val["none"]).max())}
    v = bundle.validation
    log(f"ensemble {out}: validation accuracy {v['accuracy']:.2%}, balanced {v['balanced_accuracy']:.2%}, "
        f"melanoma {v['mel_recall_at_threshold']:.2%} / {v['mel_specificity_at_threshold']:.2%} at threshold "
        f"{bundle.mel_threshold:.4f} (flips: {bundle.mel_thresholds.get('flip', float('nan')):.4f}); "
        f"against the members on their own inputs: top-1 agreement {agreement['top1_agreement']:.2%}, balanced "
        f"{agreement['balanced_accuracy_members_own_inputs']:.2%} -> {agreement['balanced_accuracy_as_shipped']:.2%}")
    return {"members": [str(m.path) for m in members], "temperature": bundle.temperature,
            "mel_threshold": bundle.mel_threshold, "mel_thresholds": bundle.mel_thresholds,
            "mel_flag_offsets": list(bundle.mel_flag_offsets), "validation": bundle.validation,
            "images": f"{len(labels)} validation images of {split}",
            "members_on_their_own_inputs": agreement}
