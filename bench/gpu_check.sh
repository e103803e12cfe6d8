#!/usr/bin/env bash
# The GPU check, one prepared command for an NVIDIA machine that cannot reach the internet.
#
# Here (with the internet): bash bench/gpu_check.sh prepare
#   copies 512 validation images into build/gpu-check/images and downloads onnxruntime-gpu into
#   build/gpu-check/wheels (and TensorRT 10 / cuda-python 12 wheels where pip finds them).
# There (carry build/gpu-check): bash bench/gpu_check.sh [OUT_DIR]
#   a venv with the machine's torch (--system-site-packages), DermEdge, onnxruntime-gpu instead of onnxruntime
#   (never both: they overwrite each other), then:
#   1. bench/gpu_check.py: FP32 / FP16 / INT8 ONNX of every shipped model on ONNX Runtime's CUDA provider and on
#      TensorRT where it imports, against ONNX Runtime CPU FP32 on the same images (agreement, images/s b1 / b32);
#   2. tests/test_tensorrt.py (strongly typed engines, gates, sidecars) and the TensorRT API name check.
set -uo pipefail
cd "$(dirname "$0")/.."
WORK=build/gpu-check
DATA="${DERM_DATA:-../shared/data/ham10000}"

if [ "${1:-}" = prepare ]; then
  mkdir -p "$WORK/images" "$WORK/wheels"
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
  .venv/bin/pip download --only-binary=:all: --no-deps -d "$WORK/wheels" onnxruntime-gpu
  .venv/bin/pip download --only-binary=:all: -d "$WORK/wheels" "cuda-python>=12.3,<13" \
    || echo "cuda-python wheels not found: TensorRT will be skipped unless the machine has it"
  du -sh "$WORK"
  exit 0
fi

OUT="${1:-${OUT:-gpu-check-out}}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -m venv --system-site-packages "$WORK/env"
PY="$WORK/env/bin/python"
"$PY" -m pip install -q --no-index --find-links "$WORK/wheels" --no-deps -e . 2>&1 | tail -2
"$PY" -m pip uninstall -y -q onnxruntime 2>/dev/null
"$PY" -m pip install -q --no-index --find-links "$WORK/wheels" onnxruntime-gpu cuda-python 2>&1 | tail -2
"$PY" -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())" | tee -a "$OUT/gpu.txt"
"$PY" -c "import tensorrt as t; print('tensorrt', t.__version__)" 2>&1 | tail -1 | tee -a "$OUT/gpu.txt"
"$PY" bench/gpu_check.py "$WORK/images" --out "$OUT/gpu_check.json" | tee "$OUT/gpu_check.txt"
"$PY" -m pytest -q tests/test_tensorrt.py tests/test_tensorrt_api.py 2>&1 | tail -15 | tee "$OUT/tests.txt"
