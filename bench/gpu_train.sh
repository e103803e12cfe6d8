#!/usr/bin/env bash
# One prepared, short GPU run of the same CLI on an NVIDIA machine (no shipped model depends on it): the shipped
# convnext's recipe with its student at 224 px. Three Lite0 fold teachers on one 12-view feature bank, each trained
# without one lesion fold and speaking only for it (`lite0-bank --views 12 --epochs 10 --holdout F/3`), then a
# ConvNeXt-Femto student at 224 px for 30 epochs (`convnext-hint`: their cross-fitted soft targets and the bank's
# ImageNet features as a hint), all with --device cuda; each evaluated on the test split, exported to ONNX
# (build/gpu/, to time and scan on a clinic CPU afterwards) and printed as the comparison table. Every step resumes:
# run it again after a cut and it goes on from the last finished epoch.
#   DERM_DATA=../shared/data/ham10000 bash bench/gpu_train.sh
# The first H200 run (2026-12-04, docs/models/experiments/gpu_h200/) taught the student from one teacher that had
# fitted every training image; this version is what it pointed to.
# DERM_PYTHON: the interpreter that has torch and can import dermtrain (default .venv/bin/python);
# DERM_STUDENT_SIZE: the student's input size (default 224; 160 repeats the shipped recipe exactly);
# DERM_STUDENT_EPOCHS: the student's epochs (default 30, the shipped recipe's);
# DERM_DEVICE=cpu with DERM_FIT_ARGS="--limit 100 --epochs 1" rehearses the whole script on a CPU in minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="${DERM_DATA:-../shared/data/ham10000}"
SPLIT=splits/ham10000_seed0.csv
PY="${DERM_PYTHON:-.venv/bin/python}"
DEVICE="${DERM_DEVICE:-cuda}"
SIZE="${DERM_STUDENT_SIZE:-224}"
EPOCHS="${DERM_STUDENT_EPOCHS:-30}"
read -r -a EXTRA <<< "${DERM_FIT_ARGS:-}"
export DERM_CACHE="${DERM_CACHE:-$PWD/.cache}"
RUNS="${DERM_RUNS:-runs}"
STUDENT="gpu-convnext-$SIZE"
[ "$EPOCHS" = 30 ] || STUDENT="$STUDENT-e$EPOCHS"

if [[ $DEVICE == cuda* ]]; then
  $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device visible to torch')"
  $PY -c "import torch; print('GPU:', torch.cuda.get_device_name(), '| torch', torch.__version__)"
fi
stamp() { echo "== $(date -u +%H:%M:%S) $*"; }
fit() {  # fit OUT ARGS...: a new run, or the rest of an interrupted one
  local out=$1; shift
  $PY -m dermtrain.cli fit --device "$DEVICE" --data "$DATA" --split $SPLIT --out "$RUNS/$out" --continue "$@" \
    "${EXTRA[@]}"
}

teachers=()
for F in 0 1 2; do
  stamp "fold teacher $F/3: Lite0 @192, 12-view bank, without lesion fold $F"
  fit "gpu-xfit-$F" --config lite0-bank --views 12 --epochs 10 --holdout "$F/3"
  teachers+=("$RUNS/gpu-xfit-$F")
done
stamp "student: ConvNeXt-Femto @$SIZE, $EPOCHS epochs, cross-fitted targets and the feature hint"
fit "$STUDENT" --config convnext-hint --img-size "$SIZE" --epochs "$EPOCHS" --teachers "${teachers[@]}"
mkdir -p build/gpu
stamp "test split and ONNX bundle: $STUDENT"
$PY -m dermtrain.cli eval "$RUNS/$STUDENT" --data "$DATA" --split-name test --quiet
$PY -m dermconvert.cli "$RUNS/$STUDENT" --onnx "build/gpu/$STUDENT.onnx" --data "$DATA" >/dev/null
stamp "comparison (latency: ONNX Runtime on this machine's CPU, 2 threads)"
$PY bench/compare_models.py "convnext$SIZE=$RUNS/$STUDENT:build/gpu/$STUDENT.onnx"
stamp done
