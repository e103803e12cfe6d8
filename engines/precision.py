"""The FP16 policy shared by the FP16 ONNX converter and the TensorRT builder: what must stay in FP32."""
from __future__ import annotations

import numpy as np

FP16_MIN_NORMAL = 6.1e-5
FP16_MAX = 65504.0


def fp16_unsafe(w: np.ndarray, share: float = 0.01) -> bool:
    """Weights FP16 cannot hold: over `share` of the non-zero values below its normal range (where precision
    collapses; BatchNorm folded into a stem convolution makes such weights) or any beyond its maximum."""
    a = np.abs(np.asarray(w, dtype=np.float32))
    a = a[a != 0]
    return a.size > 0 and (bool((a > FP16_MAX).any()) or float((a < FP16_MIN_NORMAL).mean()) > share)
