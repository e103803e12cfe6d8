"""Viewer speed on this machine: a 640x480 video made from real HAM10000 images plays as the camera, the
viewer runs offscreen for N displayed frames and prints its JSON (display/inference FPS, latency p50/p95).

    python bench/viewer_bench.py --data $DERM_DATA [--model default] [--fps 60] [--frames 600]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import cv2


def make_video(path: Path, data: Path, n_images: int = 30, frames_each: int = 20, fps: int = 30) -> Path:
    images = sorted((data / "images").glob("*.jpg")) or sorted(data.rglob("*.jpg"))
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (640, 480))
    for p in images[:: max(1, len(images) // n_images)][:n_images]:
        im = cv2.resize(cv2.imread(str(p)), (640, 480), interpolation=cv2.INTER_LINEAR)
        for _ in range(frames_each):
            w.write(im)
    w.release()
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=os.environ.get("DERM_DATA", "../shared/data/ham10000"))
    ap.add_argument("--model", default="default")
    ap.add_argument("--fps", type=float, default=60, help="camera rate the video is played at")
    ap.add_argument("--frames", type=int, default=600)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--screenshot")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        video = make_video(Path(d) / "camera.avi", Path(a.data))
        cmd = [sys.executable, "-m", "dermviewer.app", "--source", str(video), "--model", a.model, "--backend", "cpu",
               "--threads", str(a.threads), "--source-fps", str(a.fps), "--frames", str(a.frames),
               "--snapshots", d] + (["--screenshot", a.screenshot] if a.screenshot else [])
        r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "QT_QPA_PLATFORM": "offscreen"})
    if r.returncode != 0:
        sys.exit(r.stderr)
    out = json.loads(r.stdout.strip().splitlines()[-1])
    print(f"640x480 camera at {a.fps:.0f} fps, model {out['model']} on {out['backend']} ({a.threads} thread(s)):")
    print(f"display {out['display_fps']:.1f} fps, inference {out['inference_fps']:.1f} fps, "
          f"latency p50 {out['latency_p50_ms']:.1f} ms, p95 {out['latency_p95_ms']:.1f} ms over {out['frames']} frames")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
