"""FP16 ONNX: weights and most arithmetic in half precision; inputs, outputs, LayerNormalization, reductions
(global pooling included), softmax, powers and the output layers stay in float32 (ConvNeXt's LayerNorm
variance overflows in FP16).

A small converter of our own: each node runs wholly in float16 or wholly in float32, and a Cast is put on
every float tensor that crosses between the two. Non-float tensors (shapes, indices) are never touched.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from engines.bundle import ModelBundle
from engines.precision import fp16_unsafe
from engines.fsutil import atomic_path

FP32_OPS = frozenset({"LayerNormalization", "ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL2",
                      "ReduceLogSumExp", "GlobalAveragePool", "Softmax", "LogSoftmax", "Pow", "Sqrt", "Cast",
                      "Resize", "InstanceNormalization", "GroupNormalization"})


def to_fp16(model, fp32_ops: frozenset[str] = FP32_OPS):
    """An FP32 ModelProto -> its mixed-precision version (see the module docstring)."""
    from onnx import TensorProto, helper, numpy_helper, shape_inference

    model = shape_inference.infer_shapes(model)
    g = model.graph
    FLOAT, HALF = TensorProto.FLOAT, TensorProto.FLOAT16
    dtype = {vi.name: vi.type.tensor_type.elem_type for vi in [*g.input, *g.value_info, *g.output]}
    inits = {t.name: t for t in g.initializer}
    dtype.update({name: t.data_type for name, t in inits.items()})

    nodes = []
    for node in g.node:  # float Constant nodes become initializers, so weights are handled in one place
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            t = node.attribute[0].t
            t.name = node.output[0]
            inits[t.name] = t
            dtype[t.name] = t.data_type
        else:
            nodes.append(node)

    current = {i.name: FLOAT for i in g.input}  # the element type a float tensor has in the new graph
    half_inits: dict[str, object] = {}
    casts: dict[tuple[str, int], str] = {}
    out_nodes = []

    def as_type(name: str, want: int) -> str:
        if name in inits:
            if want == FLOAT:
                return name
            if name not in half_inits:
                arr = numpy_helper.to_array(inits[name]).astype(np.float16)
                half_inits[name] = numpy_helper.from_array(arr, name + "__fp16")
            return name + "__fp16"
        if current.get(name, FLOAT) == want:
            return name
        key = (name, want)
        if key not in casts:
            casts[key] = f"{name}__to{'16' if want == HALF else '32'}"
            out_nodes.append(helper.make_node("Cast", [name], [casts[key]], to=want, name=casts[key]))
        return casts[key]

    # Arithmetic on tensor shapes (TF "same" padding computes pads from the input size) stays float32.
    shape_derived: set[str] = set()
    for node in nodes:
        ins = [i for i in node.input if i]
        if node.op_type == "Shape" or (ins and any(i in shape_derived for i in ins)
                                       and all(i in shape_derived or i in inits for i in ins)):
            shape_derived.update(node.output)

    # The layers that produce the outputs (the classifier, the activation map) stay float32 too: near-ties
    # between two classes are decided there, and they cost little.
    graph_outputs = {o.name for o in g.output}
    for node in nodes:
        on_shapes = any(i in shape_derived and dtype.get(i) == FLOAT for i in node.input)
        is_head = any(o in graph_outputs for o in node.output)
        unrepresentable = any(i in inits and dtype.get(i) == FLOAT and fp16_unsafe(numpy_helper.to_array(inits[i]))
                              for i in node.input)
        want = FLOAT if node.op_type in fp32_ops or on_shapes or is_head or unrepresentable else HALF
        for i, name in enumerate(node.input):
            if name and dtype.get(name) == FLOAT:
                node.input[i] = as_type(name, want)
        for name in node.output:
            if dtype.get(name) == FLOAT:
                current[name] = FLOAT if node.op_type == "Cast" else want
        out_nodes.append(node)

    for out in g.output:  # the outputs stay float32 for every caller
        if dtype.get(out.name) == FLOAT and current.get(out.name) == HALF:
            inner = out.name + "__fp16"
            for node in out_nodes:
                node.output[:] = [inner if o == out.name else o for o in node.output]
                node.input[:] = [inner if i == out.name else i for i in node.input]
            out_nodes.append(helper.make_node("Cast", [inner], [out.name], to=FLOAT, name=out.name + "__to32"))

    used = {i for n in out_nodes for i in n.input}
    new_inits = [t for name, t in inits.items() if name in used] + [t for t in half_inits.values() if t.name in used]
    del g.node[:]
    g.node.extend(out_nodes)
    del g.initializer[:]
    g.initializer.extend(new_inits)
    del g.value_info[:]
    return shape_inference.infer_shapes(model)


def convert_fp16(src: Path, dst: Path, bundle: ModelBundle) -> ModelBundle:
    import onnx

    from dermconvert.export import set_metadata

    half = to_fp16(onnx.load(str(src)))
    out_bundle = ModelBundle(**{**bundle.__dict__, "precision": "fp16"})
    set_metadata(half, out_bundle)
    onnx.checker.check_model(half, full_check=True)
    with atomic_path(dst) as tmp:
        onnx.save(half, str(tmp))
    return out_bundle


def op_precisions(path: Path) -> dict[str, str]:
    """op type -> element types of the float tensors its nodes produce, e.g. {'LayerNormalization': 'float32'}."""
    import onnx
    from onnx import TensorProto, shape_inference

    m = shape_inference.infer_shapes(onnx.load(str(path)))
    types = {vi.name: vi.type.tensor_type.elem_type for vi in [*m.graph.value_info, *m.graph.output]}
    names = {TensorProto.FLOAT: "float32", TensorProto.FLOAT16: "float16"}
    out: dict[str, set[str]] = {}
    for node in m.graph.node:
        for o in node.output:
            if types.get(o) in names:
                out.setdefault(node.op_type, set()).add(names[types[o]])
    return {k: "/".join(sorted(v)) for k, v in out.items()}
