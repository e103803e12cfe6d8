#!/usr/bin/env bash
# One prepared, short GPU run of the same CLI on an NVIDIA machine (no shipped model depends on it): the Lite0
# teacher on a 12-view feature bank, then a ConvNeXt-Femto student at 224 px for 30 epochs (the CPU recipe's count at
# 160 px), distilled from the teacher's cached view logits and its bank's features (the shipped convnext's recipe,
# `convnext-hint`, with one teacher that is not cross-fitted), both with --device cuda, evaluated on the test split
# and printed as the comparison table. The ONNX bundles land in build/gpu/ (to time and scan them on a clinic CPU).
#   DERM_DATA=../shared/data/ham10000 bash bench/gpu_train.sh         (about 10 minutes on one H200: 2 + 7.5 + 1)
# DERM_PYTHON: the interpreter that has torch and can import dermtrain (default .venv/bin/python);
# DERM_DEVICE=cpu with DERM_FIT_ARGS="--limit 100 --epochs 1" rehearses the whole script on a CPU in about three minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="${DERM_DATA:-../shared/data/ham10000}"
SPLIT=splits/ham10000_seed0.csv
PY="${DERM_PYTHON:-.venv/bin/python}"
DEVICE="${DERM_DEVICE:-cuda}"
read -r -a EXTRA <<< "${DERM_FIT_ARGS:-}"
export DERM_CACHE="${DERM_CACHE:-$PWD/.cache}"
OUT_RUNS="${DERM_RUNS:-runs}"

if [[ $DEVICE == cuda* ]]; then
  $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device visible to torch')"
  $PY -c "import torch; print('GPU:', torch.cuda.get_device_name(), '| torch', torch.__version__)"
fi
stamp() { echo "== $(date -u +%H:%M:%S) $*"; }

stamp "teacher: Lite0 @192 on a 12-view bank"
$PY -m dermtrain.cli fit --config lite0-bank --views 12 --device "$DEVICE" --data "$DATA" --split $SPLIT \
  --out "$OUT_RUNS/gpu-lite0-bank" "${EXTRA[@]}"
stamp "student: ConvNeXt-Femto @224, 30 epochs, distilled with the feature hint"
$PY -m dermtrain.cli fit --config convnext-hint --img-size 224 --epochs 30 --device "$DEVICE" \
  --teachers "$OUT_RUNS/gpu-lite0-bank" --data "$DATA" --split $SPLIT --out "$OUT_RUNS/gpu-convnext-224" "${EXTRA[@]}"
mkdir -p build/gpu
for run in gpu-lite0-bank gpu-convnext-224; do
  stamp "test split and ONNX bundle: $run"
  $PY -m dermtrain.cli eval "$OUT_RUNS/$run" --data "$DATA" --split-name test --quiet
  $PY -m dermconvert.cli "$OUT_RUNS/$run" --onnx "build/gpu/$run.onnx" --data "$DATA" >/dev/null
done
stamp "comparison (latency: ONNX Runtime on this machine's CPU, 2 threads)"
$PY bench/compare_models.py "teacher=$OUT_RUNS/gpu-lite0-bank:build/gpu/gpu-lite0-bank.onnx" \
  "convnext224=$OUT_RUNS/gpu-convnext-224:build/gpu/gpu-convnext-224.onnx"
stamp done
