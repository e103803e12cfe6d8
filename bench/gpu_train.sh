#!/usr/bin/env bash
# One prepared, short GPU run of the same CLI on an NVIDIA machine (no shipped model depends on it): the Lite0
# teacher on a 12-view feature bank, then a ConvNeXt-Atto student at 224 px distilled from the teacher's cached view
# logits and its bank's features (the shipped convnext's recipe, `convnext-hint`, with one teacher that is not
# cross-fitted), both with --device cuda, evaluated on the test split and printed as the comparison table.
#   DERM_DATA=../shared/data/ham10000 bash bench/gpu_train.sh     (about 10-15 minutes on one modern GPU)
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="${DERM_DATA:-../shared/data/ham10000}"
SPLIT=splits/ham10000_seed0.csv
BIN=.venv/bin
$BIN/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device visible to torch')"
export DERM_CACHE="${DERM_CACHE:-$PWD/.cache}"
$BIN/dermtrain fit --config lite0-bank --views 12 --device cuda --data "$DATA" --split $SPLIT --out runs/gpu-lite0-bank
$BIN/dermtrain fit --config convnext-hint --img-size 224 --epochs 40 --device cuda --teachers runs/gpu-lite0-bank \
  --data "$DATA" --split $SPLIT --out runs/gpu-convnext-224
mkdir -p build/gpu
for run in gpu-lite0-bank gpu-convnext-224; do
  $BIN/dermtrain eval runs/$run --data "$DATA" --split-name test --quiet
  $BIN/dermconvert runs/$run --onnx build/gpu/$run.onnx --data "$DATA" >/dev/null
done
$BIN/python bench/compare_models.py teacher=runs/gpu-lite0-bank:build/gpu/gpu-lite0-bank.onnx \
  convnext224=runs/gpu-convnext-224:build/gpu/gpu-convnext-224.onnx
