#!/usr/bin/env bash
# Sets up DermEdge from scratch (virtual environment, every extra) and runs the main job: dermscan over the
# HAM10000 images in $DERM_DATA with the shipped default model on the CPU, into scan/results.csv + report.html.
set -euo pipefail
cd "$(dirname "$0")/.."
DERM_DATA="${DERM_DATA:-../shared/data/ham10000}"
if [ ! -d "$DERM_DATA" ]; then
  echo "quickstart: no HAM10000 folder at $DERM_DATA (set DERM_DATA)" >&2
  exit 1
fi
python3 -m venv .venv
.venv/bin/pip install --quiet -e '.[dev]'
mkdir -p scan
.venv/bin/dermscan "$DERM_DATA" --recursive --backend auto --overwrite --out scan/results.csv --html scan/report.html \
  --isic scan/isic.csv
