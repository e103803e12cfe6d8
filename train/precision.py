"""Where bfloat16 pays off. On a CPU with AVX-512 (oneDNN's bf16 kernels) bf16 autocast ran the frozen stages
2.6x faster than float32; on an AVX2-only CPU the same code is emulated and ran 8x slower (Lite0 @192, batch 64:
5.0 vs 39.6 images/s on a 2-core AMD EPYC, `bench/bf16_speed.py`), turning a 20-minute feature bank into hours.
So bf16 is asked for where it is known to pay, never assumed."""
from __future__ import annotations

import torch


def bf16_is_fast(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        capability = torch.backends.cpu.get_cpu_capability()
        return "AVX512" in capability or "AMX" in capability
    return False
