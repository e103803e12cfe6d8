"""PyTorch checkpoint -> ONNX bundle (opset 17, dynamic batch, metadata), checked and compared with PyTorch."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dermconvert.graph import fold_dynamic_pads
from engines.bundle import ModelBundle
from engines.fsutil import atomic_path
from engines.preprocess import PreprocessSpec

OPSET = 17  # the first opset with LayerNormalization as one op


class ConvertError(Exception):
    """A conversion that cannot go on; str() is one line."""


def cam_kind(model: nn.Module) -> str | None:
    """Which class-activation map the head allows: global pooling followed by a linear layer."""
    head = getattr(model, "head", None)
    if head is not None and isinstance(getattr(head, "fc", None), nn.Linear) and hasattr(head, "norm"):
        return "norm_linear"  # ConvNeXt: pool -> LayerNorm -> fc; the map normalises each location instead
    if isinstance(getattr(model, "classifier", None), nn.Linear) and hasattr(model, "global_pool"):
        return "linear"  # EfficientNet: pool -> fc, the map is exact
    return None


class Exportable(nn.Module):
    """The graph we ship: logits, and where the head allows it a per-class activation map."""

    def __init__(self, model: nn.Module, with_cam: bool):
        super().__init__()
        self.model = model
        self.kind = cam_kind(model) if with_cam else None

    def forward(self, x: torch.Tensor):
        f = self.model.forward_features(x)
        logits = self.model.forward_head(f)
        if self.kind is None:
            return logits
        if self.kind == "norm_linear":
            fc = self.model.head.fc
            f = self.model.head.norm(f)
        else:
            fc = self.model.classifier
        cam = F.conv2d(f, fc.weight[:, :, None, None], fc.bias)
        return logits, cam


@dataclass(frozen=True)
class Parity:
    n: int
    max_abs_logit_diff: float
    top1_agreement: float

    def ok(self, tol: float = 1e-4) -> bool:
        return self.max_abs_logit_diff <= tol and self.top1_agreement == 1.0


def bundle_for_run(run_dir: Path, state: dict, spec: PreprocessSpec, has_cam: bool, source: str) -> ModelBundle:
    cal_path = Path(run_dir) / "calibration.json"
    cal = json.loads(cal_path.read_text()) if cal_path.is_file() else {}
    return ModelBundle(model_name=state["config"]["model"], preprocess=spec,
                       temperature=float(cal.get("temperature", 1.0)),
                       mel_threshold=float(cal.get("mel_threshold", 0.5)),
                       mel_thresholds={k: float(v) for k, v in cal.get("mel_thresholds", {}).items()},
                       mel_flag_offsets=tuple(float(v) for v in cal.get("mel_flag_offsets", ())),
                       split_sha256=state.get("split_sha256", ""), validation=cal.get("validation", {}),
                       has_cam=has_cam, precision="fp32", source=source)


def export_onnx(model: nn.Module, bundle: ModelBundle, out: Path, with_cam: bool = True) -> ModelBundle:
    """Write the bundle ONNX atomically; returns the bundle as written (has_cam as the graph has it)."""
    import onnx

    model = model.eval().float()
    wrapper = Exportable(model, with_cam).eval()
    s = bundle.preprocess.size
    names = ["logits", "cam"] if wrapper.kind else ["logits"]
    dyn = {"input": {0: "batch"}, **{n: {0: "batch"} for n in names}}
    with atomic_path(out) as tmp, torch.no_grad():
        torch.onnx.export(wrapper, (torch.zeros(1, 3, s, s),), str(tmp), opset_version=OPSET, dynamo=False,
                          input_names=["input"], output_names=names, dynamic_axes=dyn, do_constant_folding=True)
        proto = onnx.load(str(tmp))
        drop_identities(proto)
        fold_dynamic_pads(proto, s)
        bundle = ModelBundle(**{**bundle.__dict__, "has_cam": wrapper.kind is not None})
        set_metadata(proto, bundle)
        onnx.checker.check_model(proto, full_check=True)
        onnx.save(proto, str(tmp))
    return bundle


def drop_identities(proto) -> int:
    """Remove the Identity nodes the exporter puts on shared constants: consumers read the source directly.
    (FP16 conversion mistypes them otherwise, and TensorRT gains nothing from them.)"""
    outputs = {o.name for o in proto.graph.output}
    alias = {}
    keep = []
    for node in proto.graph.node:
        if node.op_type == "Identity" and node.output[0] not in outputs:
            alias[node.output[0]] = alias.get(node.input[0], node.input[0])
        else:
            keep.append(node)
    for node in keep:
        for i, name in enumerate(node.input):
            if name in alias:
                node.input[i] = alias[name]
    del proto.graph.node[:]
    proto.graph.node.extend(keep)
    return len(alias)


def set_metadata(proto, bundle: ModelBundle) -> None:
    props = bundle.metadata_props()
    keep = [p for p in proto.metadata_props if p.key not in props]
    del proto.metadata_props[:]
    proto.metadata_props.extend(keep)
    for k, v in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    proto.producer_name = "dermedge"


def torch_parity(model: nn.Module, onnx_path: Path, batch: np.ndarray, chunk: int = 64) -> Parity:
    """The ONNX file on ONNX Runtime (CPU, fp32) against the PyTorch model, on the same preprocessed images, both in
    chunks: the whole validation split in one PyTorch forward needs tens of GB at 240 px."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    model = model.eval().float()
    with torch.no_grad():
        ref = np.concatenate([model(torch.from_numpy(batch[i:i + chunk])).numpy()
                              for i in range(0, len(batch), chunk)])
    got = np.concatenate([sess.run(["logits"], {"input": batch[i:i + chunk]})[0]
                          for i in range(0, len(batch), chunk)])
    return Parity(n=len(batch), max_abs_logit_diff=float(np.abs(ref - got).max()),
                  top1_agreement=float((ref.argmax(1) == got.argmax(1)).mean()))
