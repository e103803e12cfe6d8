"""TensorRT engine build and load. Runs unchanged on an NVIDIA machine with `dermedge[tensorrt]`; skips here."""
import json

import numpy as np
import pytest

from engines.tensorrt_backend import trt_unavailable

REASON = trt_unavailable()
pytestmark = [pytest.mark.tensorrt, pytest.mark.skipif(REASON is not None, reason=f"TensorRT path not testable: {REASON}")]


def test_fp16_engine_builds_with_sidecar_and_passes_gate(tiny_onnx, tiny_run, data_dir, tmp_path):
    from dermconvert.gate import compare
    from dermconvert.pipeline import validation_batch
    from engines.onnx_backend import OrtEngine
    from engines.tensorrt_backend import TrtEngine, build_engine, read_info

    plan = tmp_path / "m.plan"
    info = build_engine(tiny_onnx, plan, fp16=True, opt_batches=(1, 16), max_batch=32, timing_cache=tmp_path / "t.cache")
    side = json.loads((tmp_path / "m.plan.json").read_text())
    assert side["precision"] == "fp16" and side["gpu_name"] and side["tensorrt_version"] == info.tensorrt_version
    assert (tmp_path / "t.cache").stat().st_size > 0
    eng = TrtEngine(tiny_onnx, plan, rebuild=False)
    ref = OrtEngine(tiny_onnx)
    batch, labels = validation_batch(data_dir, tiny_run / "split.csv", ref.bundle.preprocess, limit=120, progress=False)
    assert compare(ref, eng, batch, labels, "trt").passed
    assert eng.predict_one(np.zeros((150, 200, 3), np.uint8)).probs.shape == (7,)
    assert read_info(plan).opt_batches == (1, 16)


def test_engine_from_another_onnx_is_refused(tiny_onnx, tmp_path):
    from engines.tensorrt_backend import TensorRTError, build_engine, ensure_engine

    plan = tmp_path / "m.plan"
    build_engine(tiny_onnx, plan, fp16=True, opt_batches=(1,), max_batch=4)
    side = json.loads((tmp_path / "m.plan.json").read_text())
    side["onnx_sha256"] = "0" * 64
    (tmp_path / "m.plan.json").write_text(json.dumps(side))
    with pytest.raises(TensorRTError, match="onnx_sha256"):
        ensure_engine(tiny_onnx, plan, rebuild=False)
