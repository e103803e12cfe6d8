#!/usr/bin/env bash
# DermEdge runtime on a Jetson (JetPack 6: Python 3.10, TensorRT 10 in the system site-packages).
# The virtual environment sees the system's tensorrt module; torch is not needed on the device.
set -euo pipefail
python3 -c "import tensorrt; print('TensorRT', tensorrt.__version__)"
python3 -m venv --system-site-packages ~/dermedge-venv
~/dermedge-venv/bin/pip install "dermedge[viewer]" "cuda-python>=12"
# ONNX Runtime with CUDA for Jetson comes from NVIDIA's Jetson wheels; the CPU wheel from PyPI works as a fallback.
~/dermedge-venv/bin/dermscan --help > /dev/null
echo "Build the FP16 engine for this device (minutes, once):"
echo "  ~/dermedge-venv/bin/dermviewer --backend tensorrt --source /dev/video0"
