#!/usr/bin/env bash
# DermEdge runtime on a Jetson (JetPack 6: Ubuntu 22.04, Python 3.10, TensorRT 10.3 and numpy 1 in the system
# site-packages, driver 540), from a wheel built on any machine (`python -m build --wheel` in the repository):
#   bash install.sh dermedge-0.2.0-py3-none-any.whl
# Never from the public package index: no DermEdge package is published there, and a stranger's could appear.
set -euo pipefail
WHEEL="${1:?usage: install.sh path/to/dermedge-VERSION-py3-none-any.whl}"
[ -f "$WHEEL" ] || { echo "install.sh: $WHEEL: no such wheel file" >&2; exit 2; }
# venv support and the X11 libraries Qt's xcb plugin loads (a stock JetPack 6 lacks some)
sudo apt-get install -y python3.10-venv libxcb-cursor0 libxcb-icccm4 libxcb-keysyms1 libxkbcommon-x11-0 libxcb-shape0
python3 -c "import tensorrt; print('system TensorRT', tensorrt.__version__)"
# The venv sees JetPack's tensorrt module; the `jetson` extra keeps numpy below 2 for its numpy-1 bindings and
# cuda-python at 12.x, the last series that runs on driver 540 (13.x needs driver 580 or newer).
python3 -m venv --system-site-packages ~/dermedge-venv
~/dermedge-venv/bin/pip install "$WHEEL[viewer,jetson]"
# One ONNX Runtime, never both: the CUDA build for JetPack 6 from NVIDIA's Jetson index, else the CPU one.
JETSON_INDEX="${JETSON_INDEX:-https://pypi.jetson-ai-lab.io/jp6/cu126}"
~/dermedge-venv/bin/pip install --index-url "$JETSON_INDEX" onnxruntime-gpu \
  || ~/dermedge-venv/bin/pip install onnxruntime
~/dermedge-venv/bin/dermscan --version
echo "Build the FP16 engine for this device once (minutes; strongly typed from the gated FP16 file):"
echo "  ~/dermedge-venv/bin/dermviewer --backend tensorrt --precision fp16 --source /dev/video0"
