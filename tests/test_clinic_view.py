"""The viewer and the scan report as a clinician meets them (issue #12): real widgets (offscreen, and one run
under a real X server), the real HTML parsed."""
import csv
import html.parser
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from test_viewer import ARTIFACTS, make_video, make_window, wait_until
from test_viewer import qapp  # noqa: F401 - the module's QApplication fixture

pytestmark = pytest.mark.slow


@pytest.fixture()
def engine(tiny_onnx):
    from engines.onnx_backend import OrtEngine
    return OrtEngine(tiny_onnx, threads=1)


@pytest.fixture()
def folder(tmp_path, sample_images):
    f = tmp_path / "stills"
    f.mkdir()
    for p in sample_images[:12]:
        shutil.copy(p, f / p.name)
    return f


def test_a_dead_source_clears_picture_result_and_snapshot(qapp, engine, folder, tmp_path):
    win = make_window(engine, folder, tmp_path)
    try:
        assert wait_until(qapp, lambda: win.result is not None and win.camera_rate.per_s() > 0)
        win.open_source("/dev/video98")
        assert wait_until(qapp, lambda: "NO SIGNAL" in win.view.message, 10), win.view.message
        wait_until(qapp, lambda: False, 1.5)  # a frame the old source posted last must not come back
        assert win.frame is None and win.result is None and win.view.image is None and win.view.heat is None
        assert "ISIC" not in win.source_label.text()
        assert win.view.alert_text == "" and all(n.text() == "–" for n, _, _ in win.bars)
        assert not win.snapshot_button.isEnabled() and win.snapshot() is None
        assert not list((tmp_path / "snaps").glob("*.png"))
        assert wait_until(qapp, lambda: win.camera_rate.per_s() == 0 and "camera 0 fps" in win.fps_label.text(), 5)
        win.grab().save(str(ARTIFACTS / "dermviewer-no-signal.png"))
    finally:
        win.close()


def test_a_deleted_folder_is_said_at_once(qapp, engine, folder, tmp_path):
    win = make_window(engine, folder, tmp_path)
    try:
        assert wait_until(qapp, lambda: win.result is not None)
        shutil.rmtree(folder)
        t0 = time.time()
        win.step(1)
        assert wait_until(qapp, lambda: "no such folder" in win.view.message, 4), win.view.message
        assert time.time() - t0 < 4 and win.view.image is None
    finally:
        win.close()


def test_position_name_once_and_frozen_steps(qapp, engine, folder, sample_images, tmp_path):
    win = make_window(engine, folder, tmp_path, model_label="default")
    try:
        assert wait_until(qapp, lambda: win.frame is not None)
        assert "(1 / 12)" in win.source_label.text()
        assert win.windowTitle() == "DermEdge viewer — default"
        assert "test" in win.backend_label.text()  # why the backend was chosen, visible without hovering
        win.toggle_freeze()
        assert win.step(1) is False and "unfreeze" in win.statusBar().currentMessage()
        win.toggle_freeze()
        assert win.step(1) is True
        assert wait_until(qapp, lambda: "(2 / 12)" in win.source_label.text(), 5), win.source_label.text()
    finally:
        win.close()
    single = make_window(engine, folder / sample_images[0].name, tmp_path)
    try:
        assert wait_until(qapp, lambda: single.frame is not None)
        assert single.source_label.text().count(sample_images[0].name) == 1
    finally:
        single.close()


def test_layout_fits_long_names_and_has_a_minimum_size(qapp, engine, folder, tmp_path, monkeypatch):
    from PySide6.QtWidgets import QFileDialog
    from engines.labels import class_name
    win = make_window(engine, folder, tmp_path)
    try:
        assert win.minimumWidth() >= 820 and win.minimumHeight() >= 560
        name, bar, value = win.bars[0]
        name.setText(f"{class_name('akiec')} (akiec)")
        qapp.processEvents()
        assert name.wordWrap() and name.heightForWidth(name.width()) > 0
        assert not bar.isTextVisible() and value.width() >= 56  # the number never straddles the bar's edge
        calls = []
        monkeypatch.setattr(QFileDialog, "getOpenFileName", staticmethod(lambda *a, **k: calls.append("file") or ("", "")))
        monkeypatch.setattr(QFileDialog, "getExistingDirectory", staticmethod(lambda *a, **k: calls.append("dir") or ""))
        source = win.source
        win.open_dialog()
        assert calls == ["file"] and win.source == source  # Cancel: no second dialog, nothing opened
    finally:
        win.close()


def test_heat_map_explains_melanoma_when_the_alert_is_up(qapp, engine, sample_images, tmp_path):
    from dermviewer.inference import Result
    video = make_video(tmp_path / "v.avi", sample_images[:6], 15)
    win = make_window(engine, video, tmp_path, smoothing=1)
    try:
        seen = []
        def record():
            r = win.result
            if r is not None and (not seen or seen[-1] is not r):
                seen.append(r)
            return len(seen) > 40
        wait_until(qapp, record, 30)
        assert seen
        for r in seen:
            assert isinstance(r, Result) and r.heat_class in (("mel",) if r.melanoma_flag else (r.label,))
            assert (r.heat_rgba is None) == r.heat_flat
        assert win.view.heat_caption.startswith("heat map: where the model sees")
        win.heat_box.setChecked(False)
        qapp.processEvents()
        assert win.view.heat is None
    finally:
        win.close()


def test_a_flat_map_shows_no_hot_spot():
    from engines.engine import normalize_cam
    flat = np.full((7, 7), 3.0) + np.random.default_rng(0).normal(0, 0.05, (7, 7))
    assert not normalize_cam(flat).any()
    peaked = flat.copy()
    peaked[3, 3] += 4
    m = normalize_cam(peaked)
    assert m.max() == 1 and m[3, 3] == 1


def test_alert_says_what_the_cut_off_means():
    from dermviewer.app import alert_text
    text = alert_text(0.2241, 0.0949)
    assert "22.41%" in text and "9.49%" in text and "90%" in text and "most flagged lesions are not melanomas" in text
    assert "p(melanoma) 22.41%" in text  # the flag reads the melanoma bar
    assert "melanoma score 22.41%" in alert_text(0.2241, 0.0949, own_score=True)  # its own score: not the bar's


def test_one_rounding_rule_never_contradicts_the_flag():
    from engines.display import pct, snap_threshold
    rng = np.random.default_rng(1)
    for _ in range(20000):
        t = snap_threshold(float(rng.uniform(0.001, 0.5)))
        p = t + float(rng.choice([-1, 1])) * float(rng.choice([1e-7, 1e-6, 1e-5, 4e-5, 1e-4, 1e-3]))
        p = min(max(p, 0.0), 1.0)
        shown_p, shown_t = float(pct(p)[:-1]), float(pct(t)[:-1])
        assert (shown_p >= shown_t) == (p >= t), (p, t, pct(p), pct(t))
    assert snap_threshold(0.0949) == pytest.approx(0.0949) and pct(0.0949) == "9.49%"


def test_scripted_run_with_a_dead_source_fails_with_an_error(tiny_onnx, tmp_path):
    r = subprocess.run([sys.executable, "-m", "dermviewer.app", "--source", str(tmp_path / "nowhere"), "--model",
                        str(tiny_onnx), "--frames", "5", "--max-seconds", "4"], capture_output=True, text=True,
                       timeout=60, env={**os.environ, "QT_QPA_PLATFORM": "offscreen"})
    assert r.returncode == 1, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["frames"] == 0 and "no such file or folder" in out["error"]


def test_missing_x11_libraries_are_named_in_one_line(tiny_onnx, monkeypatch, capsys):
    import ctypes.util
    from dermviewer import app
    monkeypatch.setenv("DISPLAY", ":99")
    monkeypatch.delenv("QT_QPA_PLATFORM", raising=False)
    real = ctypes.util.find_library
    monkeypatch.setattr(ctypes.util, "find_library", lambda n: None if n in ("xcb-icccm", "xcb-keysyms") else real(n))
    assert app.main(["--source", "x", "--model", str(tiny_onnx)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "libxcb-icccm4" in err[0] and "libxcb-keysyms1" in err[0] and "apt-get install" in err[0]


def test_viewer_under_a_real_x_server(tiny_onnx, sample_images, tmp_path):
    """The clinic's case: Qt's xcb plugin on an X server (Xvfb), not the offscreen platform."""
    xvfb = shutil.which("Xvfb")
    if xvfb is None:
        pytest.skip("Xvfb is not installed (.ci/run installs it: apt-get install xvfb)")
    display = f":{90 + os.getpid() % 9}"
    server = subprocess.Popen([xvfb, display, "-screen", "0", "1280x800x24", "-nolisten", "tcp"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(1.0)
        env = {k: v for k, v in os.environ.items() if k != "QT_QPA_PLATFORM"} | {"DISPLAY": display}
        video = make_video(tmp_path / "v.avi", sample_images[:3], 20)
        shot = tmp_path / "x11.png"
        r = subprocess.run([sys.executable, "-m", "dermviewer.app", "--source", str(video), "--model", str(tiny_onnx),
                            "--frames", "20", "--screenshot", str(shot)], capture_output=True, text=True, timeout=120,
                           env=env)
        if r.returncode == 2 and "missing" in r.stderr:
            pytest.fail(r.stderr.strip())
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout.strip().splitlines()[-1])["frames"] >= 20 and shot.stat().st_size > 10_000
    finally:
        server.terminate()
        server.wait(5)


class _Report(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.rows, self.ids, self.links, self.imgs, self._row = [], set(), [], 0, None
        self.text = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "tr" and "data-file" in a:
            self._row = a
            self.rows.append(a)
        if tag == "a" and self._row is not None:
            self.links.append(a["href"])
        if tag == "img" and self._row is not None:
            self._row["img"] = True
            self.imgs += 1

    def handle_data(self, data):
        self.text.append(data)


def test_report_pictures_every_suspect_filters_links_and_rounding(tiny_onnx, data_dir, tmp_path):
    from engines.display import pct
    from engines.onnx_backend import OrtEngine
    from engines.scan import report_html
    out, page = tmp_path / "r.csv", tmp_path / "r.html"
    folder = data_dir / "images"
    r = subprocess.run([sys.executable, "-m", "engines.scan.cli", str(folder), "--model", str(tiny_onnx), "--out",
                        str(out), "--html", str(page), "--limit", "600", "--quiet"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    parsed = _Report()
    parsed.feed(page.read_text(encoding="utf-8"))
    with open(out, newline="") as f:
        flagged = {x["file"] for x in csv.DictReader(f) if x["melanoma_flag"] == "1"}
    assert flagged and all(row.get("img") for row in parsed.rows if row["data-file"] in flagged)
    assert {"f-flag", "f-class", "f-search", "f-count", "results"} <= parsed.ids
    assert parsed.links and all(link.startswith("file:///") for link in parsed.links)
    assert Path(parsed.links[0][7:]).is_file()
    text = "".join(parsed.text)
    assert str(folder.resolve()) in text
    thr = OrtEngine(tiny_onnx).bundle.mel_threshold
    assert pct(thr) in text
    assert "th.s[data-dir=desc]" in page.read_text() and "!num" in report_html.SCRIPT  # numbers: highest first
    # beyond the picture budget, suspects keep theirs and the others go without
    from engines.scan.results import read_results
    rows = read_results(out)
    old_cap = report_html.MAX_UNFLAGGED_THUMBNAILS
    report_html.MAX_UNFLAGGED_THUMBNAILS = 0
    try:
        small = _Report()
        small.feed(report_html.render(rows, folder, OrtEngine(tiny_onnx).bundle, "cpu", "tiny"))
    finally:
        report_html.MAX_UNFLAGGED_THUMBNAILS = old_cap
    assert small.imgs == len(flagged) and all(bool(row.get("img")) == (row["data-file"] in flagged) for row in small.rows)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(page, ARTIFACTS / "report.html")



@pytest.mark.parametrize("width", [480, 620, 800, 1040])
def test_alert_band_shows_every_line_of_its_text_at_any_width(qapp, width):
    """A narrow view wraps the headline and the explanation onto more lines: the band grows with them, so every
    line is drawn whole inside it (a fixed 66 px band cut the headline's ends and the explanation's second line)."""
    from PySide6.QtGui import QFontMetricsF

    from dermviewer.app import alert_text
    from dermviewer.view import FrameView, PAD, detail_font, headline_font, text_height
    view = FrameView()
    view.alert_text = alert_text(0.2241, 0.0949)
    view.resize(width, 400)
    img = view.grab().toImage()
    rgb = np.array([[img.pixelColor(x, y).getRgb()[:3] for x in range(width)] for y in range(160)])
    band_rows = np.flatnonzero(((rgb[:, :, 0] > 150) & (rgb[:, :, 1] < 90)).any(axis=1))
    text_rows = np.flatnonzero((rgb > 200).all(axis=2).any(axis=1))
    drawn_lines = 1 + int((np.diff(text_rows) > 1).sum())
    headline, _, why = view.alert_text.partition("\n")
    inner = width - 2 * PAD
    expected = sum(round(text_height(f, inner, t) / QFontMetricsF(f).lineSpacing())
                   for f, t in ((headline_font(), headline), (detail_font(), why)))
    assert drawn_lines == expected and (expected > 2 or width > 480), (drawn_lines, expected)
    assert band_rows[0] == 0 and (np.diff(band_rows) == 1).all() and text_rows.max() < band_rows[-1]
