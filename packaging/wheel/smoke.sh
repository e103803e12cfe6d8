#!/usr/bin/env bash
# Builds the wheel (python -m build) and proves what a clinic installs needs no torch: the wheel goes with only its
# `cpu` extra (ONNX Runtime) into a fresh virtual environment, whose package list must hold no torch, timm or onnx, and whose
# dermscan and dermbench then classify 50 real HAM10000 images. Prints the sizes packaging/README.md reports.
#   DERM_DATA=../shared/data/ham10000 bash packaging/wheel/smoke.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA="${DERM_DATA:-../shared/data/ham10000}"
BUILD_PY="${BUILD_PY:-.venv/bin/python}"   # any Python with the `build` package (the dev environment has it)
WORK=build/wheel-smoke
rm -rf "$WORK" dist
mkdir -p "$WORK/images"

"$BUILD_PY" -m build --wheel --outdir dist . >"$WORK/build.log" 2>&1 || { tail -20 "$WORK/build.log"; exit 1; }
WHEEL=$(ls dist/dermedge-*-py3-none-any.whl)
python3 -m venv "$WORK/env"
"$WORK/env/bin/pip" install --quiet "$WHEEL[cpu]"
if "$WORK/env/bin/pip" list --format=freeze | grep -iE '^(torch|torchvision|timm|onnx)=='; then
  echo "wheel smoke: the runtime environment pulled in training packages (above)" >&2
  exit 1
fi
find "$DATA/images" -maxdepth 1 -name '*.jpg' | sort | sed -n '1,50p' | xargs -I{} cp {} "$WORK/images/"
(cd "$WORK" && env -u PYTHONPATH PATH="$PWD/env/bin:/usr/bin:/bin" dermscan --version)
(cd "$WORK" && env -u PYTHONPATH PATH="$PWD/env/bin:/usr/bin:/bin" dermscan images --out results.csv --quiet)
test "$(tail -n +2 "$WORK/results.csv" | grep -c ',ok,')" -eq 50
(cd "$WORK" && env -u PYTHONPATH PATH="$PWD/env/bin:/usr/bin:/bin" dermbench images --limit 50 --no-torch | tail -n 1)
echo "wheel: $WHEEL $(du -h "$WHEEL" | cut -f1)"
echo "runtime environment (extra cpu only): $(du -sh "$WORK/env" | cut -f1)"
[ -d .venv ] && echo "training environment (.venv, every extra): $(du -sh .venv | cut -f1)"
echo "wheel smoke: OK (50 of 50 images classified without torch)"
