"""`dermviewer`: live classification of dermatoscope frames. The capture and inference threads post into
one-slot mailboxes; the UI thread only polls them (never waits) and paints."""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

from PySide6.QtCore import Qt, QTimer
from PySide6.QtGui import QKeySequence, QShortcut
from PySide6.QtWidgets import (QApplication, QCheckBox, QComboBox, QFileDialog, QFormLayout, QHBoxLayout,
                               QInputDialog, QLabel, QMainWindow, QProgressBar, QPushButton, QSlider, QSpinBox,
                               QVBoxLayout, QWidget)

from dermviewer.inference import Guide, InferenceThread, Result
from dermviewer.mailbox import Mailbox
from dermviewer.snapshot import save_snapshot
from dermviewer.sources import CaptureThread, Frame, SourceStatus, describe
from engines.display import pct
from engines.select import PRECISIONS
from engines.version import VersionAction
from dermviewer.stats import Rate, RunStats
from dermviewer.view import FrameView
from engines.engine import Engine
from engines.labels import class_name

NOTICE = "Decision support, not a diagnosis."


class ViewerWindow(QMainWindow):
    def __init__(self, engine: Engine, source: str, backend_reason: str = "", smoothing: int = 5,
                 snapshot_dir: Path = Path("snapshots"), source_fps: float | None = None, loop: bool = True,
                 model_label: str | None = None):
        super().__init__()
        self.engine = engine
        self.snapshot_dir = snapshot_dir
        self.source_fps, self.loop = source_fps, loop
        self.model_label = model_label or engine.bundle.model_name
        self.setWindowTitle(f"DermEdge viewer — {self.model_label}")
        self.last_error = ""
        self.generation = 0  # bumped by every open_source: frames and results of an older source are dropped
        self.frames: Mailbox[Frame] = Mailbox()
        self.results: Mailbox[Result] = Mailbox()
        self.status: Mailbox[SourceStatus] = Mailbox()
        self.seen = {"frame": 0, "result": 0, "status": 0}
        self.frame: Frame | None = None
        self.result: Result | None = None
        self.frozen = False
        self.display_rate, self.infer_rate, self.camera_rate = Rate(), Rate(), Rate()
        self.run_stats = RunStats()
        self.on_frame = None  # scripted runs hook here
        self.source = source
        self.capture: CaptureThread | None = None
        self.worker = InferenceThread(engine, self.frames, self.results, smoothing)
        self._build_ui(backend_reason, smoothing)
        self.worker.start()
        self.open_source(source)
        self.timer = QTimer(self)
        self.timer.setTimerType(Qt.TimerType.PreciseTimer)
        self.timer.timeout.connect(self.poll)
        self.timer.start(5)

    # ---- layout -------------------------------------------------------------------------------------
    def _build_ui(self, backend_reason: str, smoothing: int) -> None:
        self.view = FrameView()
        side = QVBoxLayout()
        title = QLabel(f"<b>{self.model_label}</b> ({self.engine.bundle.model_name} @ "
                       f"{self.engine.bundle.preprocess.size}px)")
        title.setWordWrap(True)
        side.addWidget(title)
        self.bars = []
        for _ in range(3):
            name, bar, value = QLabel("–"), QProgressBar(), QLabel("")
            name.setWordWrap(True)
            bar.setRange(0, 1000)
            bar.setTextVisible(False)  # the number sits beside the bar, never across its edge
            value.setFixedWidth(64)
            value.setAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
            row = QHBoxLayout()
            row.addWidget(bar, 1)
            row.addWidget(value)
            side.addWidget(name)
            side.addLayout(row)
            self.bars.append((name, bar, value))
        self.fps_label = QLabel("camera – fps · inference – fps · display – fps")
        self.fps_label.setWordWrap(True)
        self.backend_label = QLabel(f"backend: {self.engine.backend} ({self.engine.bundle.precision})"
                                    + (f"<br><span style='color:#666'>{backend_reason}</span>" if backend_reason else ""))
        self.backend_label.setWordWrap(True)
        self.source_label = QLabel("")
        self.source_label.setWordWrap(True)
        side.addWidget(self.fps_label)
        side.addWidget(self.backend_label)
        side.addWidget(self.source_label)

        form = QFormLayout()
        self.heat_box = QCheckBox("heat map (H)")
        self.heat_box.setChecked(True)
        self.heat_box.setEnabled(self.engine.bundle.has_cam)
        self.heat_box.toggled.connect(self.set_heatmap)
        form.addRow(self.heat_box)
        self.smooth_spin = QSpinBox()
        self.smooth_spin.setRange(1, 30)
        self.smooth_spin.setValue(smoothing)
        self.smooth_spin.valueChanged.connect(lambda n: self.worker.smoother.set_n(n))
        form.addRow("smooth over frames", self.smooth_spin)
        self.guide_slider = QSlider(Qt.Orientation.Horizontal)
        self.guide_slider.setRange(20, 100)
        self.guide_slider.setValue(80)
        self.guide_slider.valueChanged.connect(self._guide_changed)
        form.addRow("region size", self.guide_slider)
        self.guide_shape = QComboBox()
        self.guide_shape.addItems(["circle", "square"])
        self.guide_shape.currentTextChanged.connect(self._guide_changed)
        form.addRow("region shape", self.guide_shape)
        side.addLayout(form)

        buttons = [("Freeze (Space)", self.toggle_freeze), ("Snapshot (S)", self.snapshot),
                   ("Open image or video (O)", self.open_dialog), ("Open folder (F)", self.open_folder_dialog),
                   ("Camera… (C)", self.pick_camera), ("Retry source (R)", self.retry)]
        made = {}
        for text, slot in buttons:
            b = QPushButton(text)
            b.clicked.connect(slot)
            side.addWidget(b)
            made[text] = b
        self.freeze_button, self.snapshot_button = made["Freeze (Space)"], made["Snapshot (S)"]
        self.snapshot_button.setEnabled(False)  # until a frame arrives
        side.addStretch(1)
        notice = QLabel(f"<b>{NOTICE}</b>")
        notice.setWordWrap(True)
        notice.setStyleSheet("background:#fff4e5;color:#7a3e00;border:2px solid #e07b00;padding:6px")
        side.addWidget(notice)

        panel = QWidget()
        panel.setLayout(side)
        panel.setFixedWidth(340)
        root = QWidget()
        lay = QHBoxLayout(root)
        lay.addWidget(self.view, 1)
        lay.addWidget(panel)
        self.setCentralWidget(root)
        self.resize(1040, 640)
        self.setMinimumSize(820, 560)  # below this the controls squash and the disclaimer is cut
        for key, slot in ((Qt.Key.Key_Space, self.toggle_freeze), (Qt.Key.Key_S, self.snapshot),
                          (Qt.Key.Key_O, self.open_dialog), (Qt.Key.Key_F, self.open_folder_dialog),
                          (Qt.Key.Key_C, self.pick_camera),
                          (Qt.Key.Key_R, self.retry), (Qt.Key.Key_H, self.heat_box.toggle),
                          (Qt.Key.Key_Right, lambda: self.step(1)), (Qt.Key.Key_Left, lambda: self.step(-1))):
            QShortcut(QKeySequence(key), self, activated=slot)

    # ---- sources ------------------------------------------------------------------------------------
    def open_source(self, source: str) -> None:
        if self.capture is not None:
            self.capture.stop()
            self.capture.join(timeout=1.0)
        self.source = source
        self.generation += 1
        self.source_label.setText(f"source: {describe(source)}")
        self._clear("")
        self.view.message = f"opening {describe(source)}…"
        self.view.update()
        self.capture = CaptureThread(source, self.frames, self.status, loop=self.loop, fps=self.source_fps,
                                     generation=self.generation)
        self.capture.start()

    def retry(self) -> None:
        if self.capture is not None:
            self.capture.retry_now()

    def step(self, delta: int) -> bool:
        if self.frozen:
            self.statusBar().showMessage("frozen: press Space to unfreeze before stepping to another image", 5000)
            return False
        if self.capture is not None:
            self.capture.request_step(delta)
        return True

    def open_dialog(self) -> None:
        path, _ = QFileDialog.getOpenFileName(
            self, "Open image or video", "",
            "Images and videos (*.jpg *.jpeg *.png *.bmp *.tif *.tiff *.webp *.gif *.mp4 *.avi *.mkv *.mov)")
        if path:  # Cancel opens nothing
            self.open_source(path)

    def open_folder_dialog(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Open a folder of images")
        if path:
            self.open_source(path)

    def pick_camera(self) -> None:
        cams = sorted(str(p) for p in Path("/dev").glob("video*")) or ["0"]
        choice, ok = QInputDialog.getItem(self, "Camera", "Camera device (or type an index):", cams, 0, True)
        if ok and choice:
            self.open_source(choice)

    # ---- controls -----------------------------------------------------------------------------------
    def toggle_freeze(self) -> None:
        self.frozen = not self.frozen
        self.worker.paused = self.frozen
        self.view.frozen = self.frozen
        self.freeze_button.setText("Unfreeze (Space)" if self.frozen else "Freeze (Space)")
        self.view.update()

    def set_heatmap(self, on: bool) -> None:
        self.worker.heatmap = on
        if not on:
            self.view.heat = None
            self.view.update()

    def _guide_changed(self, *_):
        g = Guide(self.guide_slider.value() / 100, self.guide_shape.currentText())
        self.worker.guide = g
        self.view.guide = g
        self.worker.smoother.buf.clear()  # a new region is a new question
        self.view.update()

    def snapshot(self) -> tuple[Path, Path] | None:
        if self.frame is None:
            self.statusBar().showMessage("nothing to save: no picture from the source", 5000)
            return None
        result = self.result if self.result is not None and self.result.frame_index <= self.frame.index else None
        try:
            paths = save_snapshot(self.snapshot_dir, self.frame.rgb, result, self.engine.bundle.classes,
                                  self.model_label, self.engine.backend, self.frame.source,
                                  self.engine.bundle.mel_threshold)
        except OSError as e:
            self.statusBar().showMessage(f"snapshot failed: {e}", 8000)
            return None
        self.statusBar().showMessage(f"saved {paths[0]}", 5000)
        return paths

    # ---- the UI loop: poll, never wait --------------------------------------------------------------
    def _clear(self, message: str) -> None:
        """No picture and no result from a source that is gone: nothing stale stays on screen or in a snapshot."""
        self.frame = self.result = None
        self.view.image = None
        self.view.frame_shape = (0, 0)
        self.view.set_result(None)
        self.view.alert_text = ""
        self.view.heat_caption = ""
        self.view.message = message
        for name, bar, value in self.bars:
            name.setText("–")
            bar.setValue(0)
            value.setText("")
        self.snapshot_button.setEnabled(False)
        self.worker.smoother.buf.clear()
        for rate in (self.camera_rate, self.infer_rate, self.display_rate):
            rate.times.clear()  # no source, no rate: 0 fps at once rather than decaying over the window
        # what is already in the mailboxes belongs to the picture just cleared: never show it again
        self.seen["frame"], self.seen["result"] = self.frames.peek()[0], self.results.peek()[0]

    def poll(self) -> None:
        seq, st = self.status.peek()
        if seq != self.seen["status"]:
            self.seen["status"] = seq
            if st.notice:
                self.statusBar().showMessage(st.message, 5000)
            elif st.ok:
                self.view.message = ""
                self.last_error = ""
            else:
                self.last_error = st.message
                self._clear(f"NO SIGNAL — {st.message}; retrying (R: retry now; O, F or C: another source)")
            self.view.update()  # a source that failed is said at once, not at the next repaint
        if self.frozen:
            return
        changed = new_frame = False
        seq, res = self.results.peek()
        if seq != self.seen["result"] and res is not None and self.frame is not None \
                and res.generation == self.generation:
            self.seen["result"] = seq
            self.result = res
            self.infer_rate.tick()
            self.run_stats.event("inference")
            self.run_stats.latencies.append(res.latency_ms)
            # a result computed just before the heat map was switched off must not bring it back
            self.view.set_result(res if self.worker.heatmap else replace(res, heat_rgba=None))
            self._show_result(res)
            changed = True
        seq, frame = self.frames.peek()
        if seq != self.seen["frame"] and frame is not None and frame.generation != self.generation:
            self.seen["frame"] = seq  # a frame of the source we just left
        elif seq != self.seen["frame"] and frame is not None:
            self.camera_rate.tick(frame.t_capture)
            self.seen["frame"] = seq
            self.frame = frame
            self.view.set_frame(frame.rgb)
            self.snapshot_button.setEnabled(True)
            self.source_label.setText(f"source: {source_text(self.source, frame)}")
            changed = new_frame = True
        if changed:
            self.view.repaint()  # paint now: the figure we report is frames actually drawn
            if new_frame:
                self.display_rate.tick()
                self.run_stats.event("display")
                if self.on_frame is not None:
                    self.on_frame(self)
        self._show_rates()

    def _show_result(self, r: Result) -> None:
        order = r.probs.argsort()[::-1][:3]
        codes = self.engine.bundle.classes
        for (name, bar, value), i in zip(self.bars, order):
            name.setText(f"{class_name(codes[i])} ({codes[i]})")
            bar.setValue(int(r.probs[i] * 1000))
            value.setText(pct(r.probs[i]))
        self.view.alert_text = alert_text(r.mel_score, self.engine.bundle.mel_threshold,
                                          bool(self.engine.bundle.mel_flag_offsets)) if r.melanoma_flag else ""
        self.view.heat_caption = heat_caption(r) if self.worker.heatmap else ""

    def _show_rates(self) -> None:
        lat = self.run_stats.latency(95)
        self.fps_label.setText(f"camera {self.camera_rate.per_s():.0f} fps · inference {self.infer_rate.per_s():.0f} fps · "
                               f"display {self.display_rate.per_s():.0f} fps" + (f" · latency p95 {lat:.0f} ms" if lat else ""))

    def summary(self) -> dict:
        s = self.run_stats
        return {"display_fps": round(s.rate("display"), 2), "inference_fps": round(s.rate("inference"), 2),
                "latency_p50_ms": None if s.latency(50) is None else round(s.latency(50), 2),
                "latency_p95_ms": None if s.latency(95) is None else round(s.latency(95), 2),
                "frames": s.count.get("display", 0), "inferences": s.count.get("inference", 0),
                "label": self.result.label if self.result else None,
                "melanoma_flag": bool(self.result.melanoma_flag) if self.result else False,
                "model": self.model_label, "network": self.engine.bundle.model_name, "backend": self.engine.backend,
                "precision": self.engine.bundle.precision,
                "source": self.source}

    def shutdown(self, timeout: float = 1.0) -> float:
        """Stop the threads; returns the seconds it took."""
        t0 = time.perf_counter()
        self.timer.stop()
        threads = [t for t in (self.capture, self.worker) if t is not None]
        for t in threads:
            t.stop()
        for t in threads:
            t.join(timeout=max(0.0, timeout - (time.perf_counter() - t0)))
        return time.perf_counter() - t0

    def threads_alive(self) -> list[str]:
        return [t.name for t in (self.capture, self.worker) if t is not None and t.is_alive()]

    def closeEvent(self, event) -> None:  # noqa: N802 - Qt's name
        self.shutdown()
        super().closeEvent(event)


def alert_text(score: float, threshold: float, own_score: bool = False) -> str:
    """What the alert means, read in a second: the melanoma score, the cut-off and why it is low. `own_score`: the
    model's flag reads its own score (re-weighted towards the training case mix), not the melanoma bar."""
    what = "melanoma score" if own_score else "p(melanoma)"
    why = ("The score is p(melanoma) at the training data's case mix, so it can differ from the bar. " if own_score
           else "")
    return (f"MELANOMA ALERT — {what} {pct(score)} ≥ cut-off {pct(threshold)}\n"
            f"{why}The cut-off is set low to catch ≥90% of melanomas (validation); most flagged lesions are not "
            "melanomas.")


def heat_caption(r: Result) -> str:
    if r.heat_class is None:
        return ""
    what = f"heat map: where the model sees {class_name(r.heat_class).lower()}"
    return what + (" — no area stands out" if r.heat_flat else "")


def source_text(source: str, frame: Frame) -> str:
    """The source once, plus the image and its place in a folder ("3 / 12")."""
    if frame.position is not None:
        return f"{describe(source)} · {frame.name} ({frame.position[0]} / {frame.position[1]})"
    return describe(source)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dermviewer", description="Live dermoscopy classification. " + NOTICE)
    p.add_argument("--version", action=VersionAction, help="version, shipped models and their ONNX sha256")
    p.add_argument("--source", default="0", help="camera index, /dev/videoN, video file, image or folder")
    p.add_argument("--model", help="ONNX bundle or shipped name (default, convnext)")
    p.add_argument("--backend", default="auto")
    p.add_argument("--precision", choices=PRECISIONS, help="run the gated file of this precision beside the model "
                   "(M.fp16.onnx, M.int8.onnx; default: the file as given)")
    p.add_argument("--threads", type=int, default=1, help="inference threads (1 leaves a core for display)")
    p.add_argument("--smooth", type=int, default=5, help="average predictions over the last N frames")
    p.add_argument("--snapshots", default="snapshots", help="folder for snapshots")
    p.add_argument("--source-fps", type=float, help="pace video files and stills at this rate")
    p.add_argument("--no-loop", action="store_true", help="do not loop video files")
    p.add_argument("--frames", type=int, help="scripted: exit after N displayed frames, print one JSON line")
    p.add_argument("--screenshot", help="scripted: save the window to this PNG before exiting")
    p.add_argument("--max-seconds", type=float, default=120, help="scripted: give up after this long")
    return p


def run_scripted(win: ViewerWindow, app: QApplication, frames: int, screenshot: str | None, max_s: float) -> dict:
    done = {"fired": False}

    def finish(*_):
        if done["fired"]:
            return
        done["fired"] = True
        if screenshot:
            Path(screenshot).parent.mkdir(parents=True, exist_ok=True)
            win.grab().save(screenshot)
        app.quit()

    def on_frame(w: ViewerWindow):
        if w.run_stats.count.get("display", 0) >= frames and w.result is not None:
            finish()

    win.on_frame = on_frame
    QTimer.singleShot(int(max_s * 1000), finish)
    app.exec()
    summary = win.summary()
    if summary["frames"] == 0 or win.result is None:
        summary["error"] = win.last_error or f"no classified frame from {describe(win.source)} in {max_s:g} s"
    win.close()
    return summary


def main(argv: list[str] | None = None) -> int:
    from engines.bundle import BundleError
    from engines.select import open_engine

    a = build_parser().parse_args(argv)
    missing = missing_qt_libraries()
    if missing:
        print(f"dermviewer: error: Qt's X11 plugin needs system libraries that are missing: {', '.join(missing)} "
              f"(Debian/Ubuntu: sudo apt-get install {' '.join(missing)})", file=sys.stderr)
        return 2
    try:
        choice = open_engine(a.model, a.backend, a.threads, max_batch=1, precision=a.precision)
    except BundleError as e:
        print(f"dermviewer: error: {e}", file=sys.stderr)
        return 2
    app = QApplication.instance() or QApplication(sys.argv[:1])
    win = ViewerWindow(choice.engine, a.source, choice.reason, a.smooth, Path(a.snapshots), a.source_fps,
                       loop=not a.no_loop, model_label=model_label(a.model))
    win.show()
    if a.frames:
        summary = run_scripted(win, app, a.frames, a.screenshot, a.max_seconds)
        print(json.dumps(summary))
        return 1 if "error" in summary else 0
    return app.exec()


# Debian/Ubuntu packages Qt 6's xcb platform plugin loads at start; without them it aborts (exit 134) with a
# message that names only the first. (library soname stem, package)
XCB_LIBRARIES = (("xcb-cursor", "libxcb-cursor0"), ("xcb-icccm", "libxcb-icccm4"), ("xcb-keysyms", "libxcb-keysyms1"),
                 ("xkbcommon-x11", "libxkbcommon-x11-0"), ("xcb-shape", "libxcb-shape0"))


def missing_qt_libraries() -> list[str]:
    """Packages missing for the X11 (xcb) platform; none when Qt will not use it (offscreen, Wayland, not Linux)."""
    import ctypes.util
    import os

    platform = os.environ.get("QT_QPA_PLATFORM", "")
    if not sys.platform.startswith("linux") or platform not in ("", "xcb") or (
            not platform and not os.environ.get("DISPLAY")):
        return []
    return [pkg for lib, pkg in XCB_LIBRARIES if ctypes.util.find_library(lib) is None]


def model_label(model: str | None) -> str:
    """The name a clinician knows the model by: the shipped name (default, convnext) or the file's name."""
    if model is None:
        return "default"
    return Path(model).stem if str(model).endswith(".onnx") else str(model)


if __name__ == "__main__":
    sys.exit(main())
