"""The TensorRT backend against the API of TensorRT 10.3 (JetPack 6), 10.x (desktop CUDA 12) and 11.x (CUDA 13),
read out of NVIDIA's binding wheels by packaging/tensorrt/api_names.py: runs here, where TensorRT cannot."""
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("api_names", ROOT / "packaging" / "tensorrt" / "api_names.py")
api = importlib.util.module_from_spec(spec)
spec.loader.exec_module(api)
LISTS = sorted((ROOT / "packaging" / "tensorrt" / "api").glob("tensorrt-*.txt"))
MAJORS = {p.stem.split("-")[1].split(".")[0] for p in LISTS}


def test_lists_cover_tensorrt_10_and_11():
    assert {"10", "11"} <= MAJORS
    for p in LISTS:
        assert "bindings" in p.read_text().splitlines()[0]
        assert len(api.read_list(p)) > 1000


@pytest.mark.parametrize("lst", LISTS, ids=lambda p: p.stem)
def test_backend_uses_only_names_every_version_has(lst):
    used = api.trt_names_used(api.BACKEND.read_text())
    assert {"STRONGLY_TYPED", "execute_async_v3", "set_tensor_address", "deserialize_cuda_engine"} <= used
    assert api.missing(api.BACKEND.read_text(), api.read_list(lst)) == []


def test_weakly_typed_build_code_fails_on_tensorrt_11_only():
    old = ("def build(trt, builder, config, network):\n"
           "    if builder.platform_has_fast_fp16:\n"
           "        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)\n"
           "    layer = network.get_layer(0)\n"
           "    layer.precision = trt.float32\n"
           "    layer.set_output_type(0, trt.float32)\n")
    for lst in LISTS:
        gone = api.missing(old, api.read_list(lst))
        if lst.stem.startswith("tensorrt-11"):
            assert {"platform_has_fast_fp16", "OBEY_PRECISION_CONSTRAINTS", "set_output_type", "precision"} <= set(gone)
        else:
            assert gone == [], lst.stem


def test_tail_merged_names_count_as_present():
    names = api.read_list(next(p for p in LISTS if p.stem == "tensorrt-10.3.0"))
    # set_output_type lives only inside reset_output_type's string in the binary
    assert "set_output_type" not in names and "reset_output_type" in names
    assert api.has(names, "set_output_type") and not api.has(names, "no_such_tensorrt_name")


def test_attributes_of_engine_objects_are_collected_through_self_and_calls():
    src = ("class T:\n    def f(self, trt):\n"
           "        self.engine.get_tensor_name(0)\n        self.engine_path.read_bytes()\n"
           "        trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(b'')\n")
    assert api.trt_names_used(src) == {"get_tensor_name", "Runtime", "Logger", "WARNING", "deserialize_cuda_engine"}
