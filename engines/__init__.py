"""DermEdge inference runtime: one Engine interface over ONNX Runtime and TensorRT.

Torch-free by design: a clinic PC or a Jetson runs this package without the training stack.
"""
from engines.labels import CLASS_CODES, CLASS_NAMES, MEL_INDEX, class_name
from engines.preprocess import PreprocessSpec, preprocess, preprocess_batch, resize_for_model

__all__ = [
    "CLASS_CODES", "CLASS_NAMES", "MEL_INDEX", "class_name",
    "PreprocessSpec", "preprocess", "preprocess_batch", "resize_for_model",
]
