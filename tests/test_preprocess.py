import numpy as np
import pytest
import torch

from dermtrain.cache import build_cache
from dermtrain.fit import predict_logits
from engines.imageio import load_rgb
from engines.preprocess import PreprocessSpec, normalize, preprocess, preprocess_batch


@pytest.mark.parametrize("spec", [PreprocessSpec(size=128), PreprocessSpec(size=224, resize="center_crop",
                                                                          mean=(0.5,) * 3, std=(0.5,) * 3)])
def test_runtime_preprocessing_matches_training_eval_transform(records, spec):
    recs = records[:40]
    cache, _ = build_cache(recs, spec, progress=False)
    train_side = normalize(cache, spec)  # what dermtrain feeds the model at evaluation
    runtime = np.stack([preprocess(load_rgb(r.path), spec) for r in recs])
    assert train_side.shape == runtime.shape == (40, 3, spec.size, spec.size)
    assert np.abs(train_side - runtime).max() <= 1e-5
    # and against an independent computation of the normalisation
    manual = (cache[0].astype(np.float64) / 255 - np.array(spec.mean)) / np.array(spec.std)
    assert np.abs(runtime[0] - manual.transpose(2, 0, 1)).max() < 1e-5


def test_batch_of_mixed_sizes(records):
    spec = PreprocessSpec(size=64)
    a = load_rgb(records[0].path)
    b = np.ascontiguousarray(a[::2, ::3])
    out = preprocess_batch([a, b], spec)
    assert out.shape == (2, 3, 64, 64) and out.dtype == np.float32


@pytest.mark.slow
def test_onnx_engine_matches_training_model_on_real_images(tiny_run, tiny_onnx, records):
    from dermtrain.evaluate import load_run_model
    from engines.onnx_backend import OrtEngine

    model, _, spec, _ = load_run_model(tiny_run)
    eng = OrtEngine(tiny_onnx)
    assert eng.bundle.preprocess == spec
    recs = records[100:132]
    cache, _ = build_cache(recs, spec, progress=False)
    ref = predict_logits(model, cache, spec, torch.device("cpu"), channels_last=False)
    logits, _ = eng.forward(preprocess_batch([load_rgb(r.path) for r in recs], spec))
    assert np.abs(ref - logits).max() <= 1e-4
