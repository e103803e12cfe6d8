#!/usr/bin/env bash
# The GPU check, one prepared command for an NVIDIA machine that cannot reach the internet.
#
# Here (with the internet): bash bench/gpu_check.sh prepare
#   copies 512 validation images into build/gpu-check/images and downloads onnxruntime-gpu (CUDA 13 since 1.31;
#   255 MB) split into 50 MiB parts under build/gpu-check/parts: a lent machine takes 64 MiB of working tree a call,
#   so the parts travel one call each (carry build/gpu-check/parts/NAME, `cp` it to /tmp/stage there) while the
#   machine stays warm, the shipped bundles left out of those calls (docs/models/experiments/gpu_h200/README.md).
# There (carry build/gpu-check/images): bash bench/gpu_check.sh [OUT_DIR]
#   joins /tmp/stage's parts, installs the wheel under /tmp/site (beside, not over, the machine's own onnxruntime),
#   finds the CUDA libraries the machine's PyTorch brought (pip's nvidia-* packages), then:
#   1. bench/gpu_check.py: FP32 / FP16 / INT8 ONNX of every shipped model on ONNX Runtime's CUDA provider and on
#      TensorRT where it imports, against ONNX Runtime CPU FP32 on the same images (agreement, images/s b1 / b32);
#   2. dermscan of the images with --backend auto (what it picks, and the CSV to compare with a CPU scan here);
#   3. tests/test_tensorrt.py and the TensorRT API name check, where pytest is there (they skip without TensorRT).
set -uo pipefail
cd "$(dirname "$0")/.."
WORK=build/gpu-check
DATA="${DERM_DATA:-../shared/data/ham10000}"

if [ "${1:-}" = prepare ]; then
  mkdir -p "$WORK/images" "$WORK/wheels" "$WORK/parts"
  .venv/bin/python - "$DATA" "$WORK/images" <<'EOF'
import shutil, sys
from pathlib import Path
from dermtrain.data import load_records
from dermtrain.splits import read_manifest, select
data, out = Path(sys.argv[1]), Path(sys.argv[2])
recs = select(read_manifest(Path("splits/ham10000_seed0.csv")), load_records(data), "val", 512, seed=0)
for r in recs:
    shutil.copy(r.path, out / Path(r.path).name)
print(f"{len(recs)} validation images -> {out}")
EOF
  .venv/bin/python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d "$WORK/wheels" onnxruntime-gpu
  wheel=$(ls "$WORK"/wheels/onnxruntime_gpu-*.whl | head -1)
  rm -f "$WORK"/parts/*
  split -b 50m "$wheel" "$WORK/parts/$(basename "$wheel").part-"
  ls -la "$WORK/parts"
  exit 0
fi

OUT="${1:-${OUT:-gpu-check-out}}"
mkdir -p "$OUT"
parts=(/tmp/stage/*.whl.part-*)
[ -e "${parts[0]}" ] || { echo "gpu_check: no staged onnxruntime-gpu parts in /tmp/stage"; exit 2; }
wheel="/tmp/$(basename "${parts[0]}" | sed 's/\.part-.*//')"
cat "${parts[@]}" > "$wheel"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$wheel" 2>&1 | tail -2
# ONNX Runtime's CUDA provider loads cuDNN, cuBLAS and the runtime by name: those of the machine's torch will do.
LD_LIBRARY_PATH="$(find / -xdev -path '*site-packages/nvidia/*/lib' -type d 2>/dev/null | tr '\n' ':')${LD_LIBRARY_PATH:-}"
export LD_LIBRARY_PATH PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())" | tee -a "$OUT/gpu.txt"
python3 -c "import tensorrt as t; print('tensorrt', t.__version__)" 2>&1 | tail -1 | tee -a "$OUT/gpu.txt"
python3 bench/gpu_check.py "$WORK/images" --out "$OUT/gpu_check.json" | tee "$OUT/gpu_check.txt"
python3 -c "import sys; from engines.scan.cli import main; sys.exit(main())" "$WORK/images" --out "$OUT/scan.csv" \
  --backend auto --quiet 2>&1 | tee -a "$OUT/gpu_check.txt"
python3 -m pytest -q -p no:cacheprovider tests/test_tensorrt.py tests/test_tensorrt_api.py 2>&1 | tail -5 \
  | tee "$OUT/tests.txt"
