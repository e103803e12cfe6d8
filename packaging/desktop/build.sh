#!/usr/bin/env bash
# Builds the desktop bundle dist/DermEdge/ (dermviewer + dermscan, the models, icon, launcher, clinic README) with
# PyInstaller from a clean, torch-free environment: the wheel plus the viewer extra.
#   bash packaging/desktop/build.sh            (Linux; the same spec builds on Windows/macOS, untried here)
set -euo pipefail
cd "$(dirname "$0")/../.."
HERE=packaging/desktop
ENV=build/desktop-env
BUILD_PY="${BUILD_PY:-.venv/bin/python}"
mkdir -p build
rm -rf dist/DermEdge build/pyinstaller
ls dist/dermedge-*-py3-none-any.whl >/dev/null 2>&1 || "$BUILD_PY" -m build --wheel --outdir dist . >build/wheel.log 2>&1
WHEEL=$(ls dist/dermedge-*-py3-none-any.whl | tail -n 1)
[ -x "$ENV/bin/python" ] || python3 -m venv "$ENV"
"$ENV/bin/pip" install --quiet --force-reinstall --no-deps "$WHEEL"
"$ENV/bin/pip" install --quiet "$WHEEL[viewer,cpu]" "pyinstaller>=6.10"
"$ENV/bin/pyinstaller" --noconfirm --log-level WARN --distpath dist --workpath build/pyinstaller "$HERE/dermedge.spec"
cp "$HERE/CLINIC-README.txt" dist/DermEdge/README.txt
cp "$HERE/dermedge.png" dist/DermEdge/dermedge.png
sed "s|^Exec=.*|Exec=$PWD/dist/DermEdge/dermviewer --source 0|; s|^Name=.*|Name=DermEdge Viewer|" \
  "$HERE/dermviewer.desktop" > dist/DermEdge/dermedge.desktop
echo "Icon=$PWD/dist/DermEdge/dermedge.png" >> dist/DermEdge/dermedge.desktop
echo "built dist/DermEdge ($(du -sh dist/DermEdge | cut -f1)): $(ls dist/DermEdge | tr '\n' ' ')"
