#!/usr/bin/env bash
# Reproduces the shipped models: train (2-core CPU: about 1.5 hours each when run side by side), evaluate on the
# test split (plain and with test-time flips), convert with the FP16 gate, and install into engines/models.
#   DERM_DATA=../shared/data/ham10000 bash packaging/build_models.sh [train|ship]
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="${DERM_DATA:-../shared/data/ham10000}"
SPLIT=splits/ham10000_seed0.csv
BIN=.venv/bin
stage="${1:-all}"

if [ "$stage" = all ] || [ "$stage" = train ]; then
  # --threads 1 each: the two runs share the two cores better than one after the other.
  $BIN/dermtrain fit --config cpu-lite0 --data "$DATA" --split $SPLIT --out runs/lite0 --threads 1 &
  $BIN/dermtrain fit --config cpu --data "$DATA" --split $SPLIT --out runs/convnext_atto --threads 1 &
  wait
fi

if [ "$stage" = all ] || [ "$stage" = ship ]; then
  mkdir -p build/models
  for run in lite0 convnext_atto; do
    $BIN/dermtrain eval runs/$run --data "$DATA" --split-name test --quiet
    $BIN/dermtrain eval runs/$run --data "$DATA" --split-name test --tta flip --quiet
    $BIN/dermconvert runs/$run --onnx build/models/$run.onnx --fp16 --data "$DATA"
  done
  cp build/models/lite0.onnx engines/models/efficientnet_lite0.onnx
  cp build/models/convnext_atto.onnx engines/models/convnext_atto.onnx
  $BIN/python bench/compare_models.py default=runs/lite0:build/models/lite0.onnx \
    convnext=runs/convnext_atto:build/models/convnext_atto.onnx --out docs/models/comparison.md
fi
