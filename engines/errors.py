"""One line for an exception from a library that raises many types (TensorRT, CUDA, ONNX Runtime's quantizer):
the type and the message with its whitespace folded, so a user's error never spans lines."""
from __future__ import annotations


def one_line(e: BaseException, limit: int = 200) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:limit]}" if text else type(e).__name__
