"""Whether bfloat16 autocast pays on this CPU: the frozen early stages of Lite0 @192 (what a feature bank runs) in
float32 and under bf16 autocast, and what `dermtrain.precision` decides.

    python bench/bf16_speed.py [--batch 64] [--repeats 3]
"""
from __future__ import annotations

import argparse
import time

import torch

from dermtrain.models import create_model
from dermtrain.precision import bf16_is_fast
from dermtrain.stages import Cut


def images_per_s(cut: Cut, x: torch.Tensor, bf16: bool, repeats: int) -> float:
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        cut.early(x)  # warm-up: oneDNN picks its kernels on the first call
        t0 = time.perf_counter()
        for _ in range(repeats):
            cut.early(x)
    return repeats * len(x) / (time.perf_counter() - t0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args(argv)
    model = create_model("tf_efficientnet_lite0", init="pypi:efficientnet-lite0").eval()
    model = model.to(memory_format=torch.channels_last)
    cut = Cut(model, 4)
    cut.freeze_early()
    x = torch.randn(a.batch, 3, 192, 192).contiguous(memory_format=torch.channels_last)
    fp32, bf16 = (images_per_s(cut, x, b, a.repeats) for b in (False, True))
    print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads")
    print(f"float32 {fp32:.1f} img/s, bf16 autocast {bf16:.1f} img/s ({bf16 / fp32:.2f}x)")
    print(f"dermtrain.precision uses bf16 here: {bf16_is_fast(torch.device('cpu'))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
