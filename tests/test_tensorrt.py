"""TensorRT engine build and load. Runs unchanged on an NVIDIA machine with TensorRT 10.x or 11.x and cuda-python
(see packaging/README.md); skips here. bench/gpu_check.sh runs it."""
import json

import numpy as np
import pytest

from engines.tensorrt_backend import trt_unavailable

REASON = trt_unavailable()
pytestmark = [pytest.mark.tensorrt, pytest.mark.skipif(REASON is not None, reason=f"TensorRT path not testable: {REASON}")]


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_strongly_typed_engine_builds_from_the_gated_file_and_passes_its_gate(tiny_onnx, tiny_run, data_dir, tmp_path,
                                                                               precision):
    from dermconvert.gate import compare
    from dermconvert.pipeline import validation_batch
    from engines.onnx_backend import OrtEngine
    from engines.select import with_precision
    from engines.tensorrt_backend import TrtEngine, build_engine, read_info

    src = with_precision(tiny_onnx, precision)
    plan = tmp_path / "m.plan"
    info = build_engine(src, plan, max_batch=16, timing_cache=tmp_path / "t.cache")
    side = json.loads((tmp_path / "m.plan.json").read_text())
    assert side["precision"] == precision and side["gpu"] and side["tensorrt_version"] == info.tensorrt_version
    assert "sms" in side["gpu"] and "MiB" in side["gpu"]  # Orin modules share a name: SMs and memory tell them apart
    assert (tmp_path / "t.cache").stat().st_size > 0
    eng = TrtEngine(src, plan, rebuild=False, max_batch=16)
    ref = OrtEngine(tiny_onnx)
    batch, labels = validation_batch(data_dir, tiny_run / "split.csv", ref.bundle.preprocess, limit=120, progress=False)
    assert compare(ref, eng, batch, labels, "trt").passed
    assert eng.predict_one(np.zeros((150, 200, 3), np.uint8)).probs.shape == (7,)
    assert read_info(plan).max_batch == 16
    eng.close()
    with pytest.raises(Exception, match="closed"):
        eng.run(batch[:1])


def test_engine_from_another_onnx_or_too_small_a_batch_is_refused(tiny_onnx, tmp_path):
    from engines.tensorrt_backend import TensorRTError, build_engine, ensure_engine

    plan = tmp_path / "m.plan"
    build_engine(tiny_onnx, plan, max_batch=4)
    with pytest.raises(TensorRTError, match="largest batch is 4"):
        ensure_engine(tiny_onnx, plan, rebuild=False, max_batch=8)
    side = json.loads((tmp_path / "m.plan.json").read_text())
    side["onnx_sha256"] = "0" * 64
    (tmp_path / "m.plan.json").write_text(json.dumps(side))
    with pytest.raises(TensorRTError, match="onnx_sha256"):
        ensure_engine(tiny_onnx, plan, rebuild=False, max_batch=4)


def test_a_damaged_timing_cache_only_costs_time(tiny_onnx, tmp_path):
    from engines.tensorrt_backend import build_engine

    cache = tmp_path / "t.cache"
    cache.write_bytes(b"not a timing cache")
    build_engine(tiny_onnx, tmp_path / "m.plan", max_batch=2, timing_cache=cache, log=lambda *_: None)
    assert (tmp_path / "m.plan").stat().st_size > 0 and cache.read_bytes() != b"not a timing cache"
