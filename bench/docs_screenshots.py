"""Regenerates the screenshots in docs/: the viewer (a melanoma alert with its heat map, and a dead source) in
a real offscreen Qt window, and the scan report rendered by headless Chromium.

    QT_QPA_PLATFORM=offscreen python bench/docs_screenshots.py --data $DERM_DATA [--model default]
"""
from __future__ import annotations

import argparse
import csv
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
DOCS = Path(__file__).resolve().parents[1] / "docs"


def _pump(app, cond, timeout: float = 20.0) -> bool:
    end = time.time() + timeout
    while time.time() < end:
        app.processEvents()
        if cond():
            return True
        time.sleep(0.01)
    return False


def viewer_shots(model: str, data: Path, work: Path) -> None:
    from PySide6.QtWidgets import QApplication

    from dermviewer.app import ViewerWindow
    from engines.select import open_engine
    from engines.imageio import load_rgb

    choice = open_engine(model, "cpu", 1, max_batch=1)
    eng = choice.engine
    # a melanoma from HAM10000 that this model flags, shown as a one-image folder
    with open(data / "HAM10000_metadata.csv", newline="") as f:
        mels = [r["image_id"] for r in csv.DictReader(f) if r["dx"] == "mel"]
    folder = work / "stills"
    folder.mkdir()
    from dermviewer.inference import Guide
    for iid in mels:  # flagged on the region the viewer classifies (the centred guide), not the whole image
        p = data / "images" / f"{iid}.jpg"
        if not p.is_file():
            continue
        rgb = load_rgb(p)
        top, left, side, _ = Guide().box(*rgb.shape[:2])
        if eng.predict_one(rgb[top:top + side, left:left + side].copy()).melanoma_flag:
            shutil.copy(p, folder / p.name)
            break
    app = QApplication.instance() or QApplication([])
    win = ViewerWindow(eng, str(folder), choice.reason, smoothing=1, snapshot_dir=work / "snaps",
                       model_label=model)
    win.resize(1120, 680)
    win.show()
    _pump(app, lambda: win.result is not None and win.result.melanoma_flag)
    _pump(app, lambda: False, 0.5)
    win.grab().save(str(DOCS / "dermviewer.png"))
    win.open_source("/dev/video99")
    _pump(app, lambda: "NO SIGNAL" in win.view.message, 10)
    win.grab().save(str(DOCS / "dermviewer-no-signal.png"))
    win.close()


def report_shot(model: str, data: Path, work: Path) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        print("docs_screenshots: no chromium (apt-get install chromium): report screenshot skipped", file=sys.stderr)
        return
    page = work / "report.html"
    subprocess.run([sys.executable, "-m", "engines.scan.cli", str(data / "images"), "--model", model, "--limit", "400",
                    "--out", str(work / "r.csv"), "--html", str(page), "--quiet"], check=True)
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={work / 'ch'}",
                    "--window-size=1300,1100", f"--screenshot={DOCS / 'report.png'}", page.as_uri()],
                   check=True, capture_output=True, timeout=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", default=os.environ.get("DERM_DATA", "../shared/data/ham10000"))
    ap.add_argument("--model", default="default")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        viewer_shots(a.model, Path(a.data), Path(d))
        report_shot(a.model, Path(a.data), Path(d))
    print(f"wrote {', '.join(p.name for p in sorted(DOCS.glob('*.png')))} in {DOCS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
