#!/usr/bin/env bash
# Smoke test of the built bundle with no Python environment on PATH: the bundled dermscan on 50 real images and the
# bundled dermviewer on a video under a real X server (Xvfb), with its cold start to the first classified frame.
# Prints what packaging/README.md reports; the output of the last run is committed as smoke-output.txt.
#   DERM_DATA=../shared/data/ham10000 bash packaging/desktop/smoke.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT="$PWD"
DATA="${DERM_DATA:-../shared/data/ham10000}"
APP="$PWD/dist/DermEdge"
WORK="$PWD/build/desktop-smoke"
rm -rf "$WORK" && mkdir -p "$WORK/images"
find "$DATA/images" -maxdepth 1 -name '*.jpg' | sort | sed -n '1,50p' | xargs -I{} cp {} "$WORK/images/"
CLEAN=(env -i HOME="$HOME" PATH=/usr/bin:/bin LANG=C.UTF-8)
cd "$WORK"
"${CLEAN[@]}" "$APP/dermscan" --version | head -n 1
"${CLEAN[@]}" "$APP/dermscan" images --out results.csv --quiet
test "$(tail -n +2 results.csv | grep -c ',ok,')" -eq 50
# a 60-frame clip of real images as the camera (made with the dev environment's OpenCV: a test fixture only)
"$ROOT/.venv/bin/python" - <<'PY'
import glob
import cv2
w = cv2.VideoWriter("clip.avi", cv2.VideoWriter_fourcc(*"MJPG"), 30, (640, 480))
for p in sorted(glob.glob("images/*.jpg"))[:3]:
    im = cv2.resize(cv2.imread(p), (640, 480))
    for _ in range(20):
        w.write(im)
w.release()
PY
Xvfb :77 -screen 0 1280x800x24 -nolisten tcp >/dev/null 2>&1 &
XVFB=$!
trap 'kill $XVFB 2>/dev/null || true' EXIT
sleep 1
t0=$(date +%s.%N)
"${CLEAN[@]}" DISPLAY=:77 "$APP/dermviewer" --source clip.avi --frames 1 >first.json
t1=$(date +%s.%N)
"${CLEAN[@]}" DISPLAY=:77 "$APP/dermviewer" --source clip.avi --frames 30 --screenshot shot.png | tail -n 1
test -s shot.png
echo "bundle: $(du -sh "$APP" | cut -f1) ($(find "$APP" -type f | wc -l) files)"
echo "cold start to the first classified frame (dermviewer, Xvfb): $(echo "$t1 - $t0" | bc) s"
echo "desktop smoke: OK (dermscan 50/50 images, dermviewer 30 frames under X11, no Python environment on PATH)"
