"""The viewer in a real (offscreen) Qt window, fed by video files made from real HAM10000 images."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
pytest.importorskip("PySide6")
from PySide6.QtWidgets import QApplication  # noqa: E402

pytestmark = pytest.mark.slow
ARTIFACTS = Path(os.environ.get("DERM_TEST_ARTIFACTS", Path(__file__).resolve().parents[1] / "test-artifacts"))


def make_video(path: Path, images: list[Path], frames_each: int, size=(640, 480), fps=30) -> Path:
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, size)
    for p in images:
        im = cv2.resize(cv2.imread(str(p)), size)
        for _ in range(frames_each):
            w.write(im)
    w.release()
    assert path.stat().st_size > 0
    return path


@pytest.fixture(scope="module")
def qapp():
    return QApplication.instance() or QApplication([])


@pytest.fixture()
def engine(tiny_onnx):
    from engines.onnx_backend import OrtEngine
    return OrtEngine(tiny_onnx, threads=1)


def wait_until(app, cond, timeout=20.0):
    end = time.time() + timeout
    while time.time() < end:
        app.processEvents()
        if cond():
            return True
        time.sleep(0.005)
    return False


def make_window(engine, source, tmp_path, **kw):
    from dermviewer.app import ViewerWindow
    win = ViewerWindow(engine, str(source), "test", snapshot_dir=tmp_path / "snaps", **kw)
    win.show()
    return win


def test_overlay_shows_the_engines_label_for_a_known_frame(qapp, engine, sample_images, tmp_path):
    mel_image = next(p for p in sample_images if "ISIC" in p.name)
    video = make_video(tmp_path / "static.avi", [mel_image], 60)
    win = make_window(engine, video, tmp_path, smoothing=1)
    try:
        assert wait_until(qapp, lambda: win.result is not None and win.run_stats.count.get("display", 0) >= 20)
        frame = win.frame.rgb
        top, left, s, _ = win.worker.guide.box(*frame.shape[:2])
        expected = engine.predict_one(np.ascontiguousarray(frame[top:top + s, left:left + s]))
        assert win.result.label == expected.label
        assert np.allclose(win.result.probs, expected.probs, atol=1e-5)
        shown = [name.text() for name, _, _ in win.bars][0]
        assert f"({expected.label})" in shown
        assert ("MELANOMA ALERT" in win.view.alert_text) == expected.melanoma_flag
        assert win.result.mel_score == pytest.approx(expected.mel_score, abs=1e-5)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shot = ARTIFACTS / "dermviewer.png"
        assert win.grab().save(str(shot)) and shot.stat().st_size > 10_000
    finally:
        win.close()


def test_freeze_and_snapshot_write_the_expected_files(qapp, engine, sample_images, tmp_path):
    video = make_video(tmp_path / "v.avi", sample_images[:4], 10)
    win = make_window(engine, video, tmp_path)
    try:
        assert wait_until(qapp, lambda: win.result is not None)
        win.toggle_freeze()
        frozen_seq = win.seen["frame"]
        end = time.time() + 0.4
        while time.time() < end:
            qapp.processEvents()
            time.sleep(0.01)
        assert win.seen["frame"] == frozen_seq and win.view.frozen and win.worker.paused
        png, meta = win.snapshot()
        info = json.loads(meta.read_text())
        img = cv2.imread(str(png))
        assert img.shape[:2] == win.frame.rgb.shape[:2] == (480, 640)
        for key in ("probabilities", "label", "model", "backend", "timestamp", "source", "melanoma_flag",
                    "melanoma_score"):
            assert key in info, key
        assert info["melanoma_flag"] == (info["melanoma_score"] >= info["melanoma_threshold"])
        assert info["label"] == win.result.label and abs(sum(info["probabilities"].values()) - 1) < 1e-4
        win.toggle_freeze()
        assert wait_until(qapp, lambda: win.seen["frame"] > frozen_seq, 5)
    finally:
        win.close()


def test_source_failing_mid_stream_keeps_the_window_alive(qapp, engine, sample_images, tmp_path):
    good = make_video(tmp_path / "full.avi", sample_images[:6], 20)
    broken = tmp_path / "unplugged.avi"
    broken.write_bytes(good.read_bytes()[: good.stat().st_size // 2])  # the stream stops half way
    win = make_window(engine, broken, tmp_path)
    try:
        assert wait_until(qapp, lambda: win.run_stats.count.get("display", 0) > 5)
        assert wait_until(qapp, lambda: "stopped delivering frames" in win.view.message, 30), win.view.message
        assert win.isVisible() and set(win.threads_alive()) == {"dermviewer-capture", "dermviewer-inference"}
        assert "retrying" in win.view.message
        win.retry()  # the source comes back (the file plays again until it breaks again)
        n = win.run_stats.count.get("display", 0)
        assert wait_until(qapp, lambda: win.run_stats.count.get("display", 0) > n, 10)
    finally:
        win.close()


def test_camera_that_cannot_open_gives_a_message(qapp, engine, tmp_path):
    win = make_window(engine, "/dev/video97", tmp_path)
    try:
        assert wait_until(qapp, lambda: "cannot open" in win.view.message, 10), win.view.message
        assert win.isVisible()
    finally:
        win.close()


def test_folder_source_skips_unreadable_images(qapp, engine, sample_images, tmp_path):
    import shutil
    folder = tmp_path / "stills"
    folder.mkdir()
    (folder / "a_broken.jpg").write_bytes(b"not a jpeg")
    shutil.copy(sample_images[0], folder / "b_lesion.jpg")
    win = make_window(engine, folder, tmp_path)
    try:
        assert wait_until(qapp, lambda: win.result is not None)
        assert win.frame.name == "b_lesion.jpg"
        assert wait_until(qapp, lambda: "skipped unreadable image" in win.statusBar().currentMessage(), 5)
    finally:
        win.close()


def test_closing_stops_all_threads_within_a_second(qapp, engine, sample_images, tmp_path):
    video = make_video(tmp_path / "v.avi", sample_images[:2], 30)
    win = make_window(engine, video, tmp_path)
    assert wait_until(qapp, lambda: win.result is not None)
    t0 = time.perf_counter()
    win.close()
    assert time.perf_counter() - t0 < 1.0
    assert win.threads_alive() == []


def test_scripted_run_prints_json_and_saves_screenshot(tiny_onnx, sample_images, tmp_path):
    video = make_video(tmp_path / "v.avi", sample_images[:3], 20)
    shot = tmp_path / "shot.png"
    r = subprocess.run([sys.executable, "-m", "dermviewer.app", "--source", str(video), "--model", str(tiny_onnx),
                        "--precision", "fp16", "--frames", "40", "--screenshot", str(shot), "--snapshots", str(tmp_path / "s")],
                       capture_output=True, text=True, timeout=120, env={**os.environ, "QT_QPA_PLATFORM": "offscreen"})
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    for key in ("display_fps", "inference_fps", "latency_p50_ms", "latency_p95_ms", "frames", "label"):
        assert key in out
    assert out["precision"] == "fp16"  # the gated model.fp16.onnx beside the model
    assert out["frames"] >= 40 and out["label"] in ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
    assert out["display_fps"] > 5 and out["latency_p95_ms"] < 1000
    assert shot.stat().st_size > 10_000
    assert "Traceback" not in r.stderr and "QThread" not in r.stderr


def test_a_long_session_does_not_leak_references_to_none(qapp, engine, sample_images, tmp_path):
    """PySide6 6.12.0 dropped a reference to None on every void call: the viewer died after ~8,000 calls.
    A live session makes dozens of such calls a frame, so the balance must hold over many frames."""
    video = make_video(tmp_path / "v.avi", sample_images[:2], 30)
    win = make_window(engine, video, tmp_path, source_fps=120)
    try:
        assert wait_until(qapp, lambda: win.result is not None)
        before = sys.getrefcount(None)
        n = win.run_stats.count.get("display", 0)
        assert wait_until(qapp, lambda: win.run_stats.count.get("display", 0) >= n + 150, 30)
        assert sys.getrefcount(None) - before > -200, "references to None are being lost: check the PySide6 version"
    finally:
        win.close()
