"""Frame sources: a camera (index or /dev/videoN), a video file (a stand-in camera, looped), a still image or a
folder of images (stepped through). The capture thread owns the source and posts the newest frame."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from dermviewer.mailbox import Mailbox
from engines.imageio import ImageReadError, is_image_file, load_rgb

VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mjpeg", ".mjpg")


@dataclass(frozen=True)
class Frame:
    rgb: np.ndarray
    t_capture: float  # time.perf_counter() when the frame was read
    index: int
    source: str
    name: str = ""  # file name, for stills
    position: tuple[int, int] | None = None  # (n, of) in a folder of stills
    generation: int = 0  # which opening of a source it came from: the window drops frames of an older one


@dataclass(frozen=True)
class SourceStatus:
    ok: bool
    message: str
    notice: bool = False  # a passing remark (an image skipped) rather than a change of state


class SourceError(Exception):
    """A source that cannot be opened; str() is one line."""


def describe(source: str) -> str:
    return f"camera {source}" if source.isdigit() or source.startswith("/dev/video") else source


class CaptureSource:
    """Camera or video file through OpenCV."""

    def __init__(self, source: str, loop: bool = True, fps: float | None = None):
        self.source = source
        self.loop = loop
        self.is_file = not (source.isdigit() or source.startswith("/dev/video"))
        if self.is_file and not Path(source).is_file():
            raise SourceError(f"{source}: video file not found")
        self.cap = cv2.VideoCapture(int(source) if source.isdigit() else source)
        if not self.cap.isOpened():
            self.cap.release()
            raise SourceError(f"{describe(source)}: cannot open")
        native = self.cap.get(cv2.CAP_PROP_FPS) or 0.0
        # Files are paced at their own rate (or --source-fps); cameras pace themselves.
        self.period = 1.0 / (fps or native or 30.0) if self.is_file else 0.0
        self.frames = int(self.cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        self.read_count = 0

    def read(self) -> np.ndarray:
        ok, bgr = self.cap.read()
        if not ok and self.is_file and self.loop and self.read_count > 0 and self._at_end():
            self.cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
            ok, bgr = self.cap.read()
        if not ok or bgr is None:
            raise SourceError(f"{describe(self.source)}: stopped delivering frames")
        self.read_count += 1
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)

    def _at_end(self) -> bool:
        pos = int(self.cap.get(cv2.CAP_PROP_POS_FRAMES) or 0)
        return self.frames <= 0 or pos >= self.frames - 1

    def close(self) -> None:
        self.cap.release()


class StillSource:
    """A still image or a folder of them, shown one at a time (repeated as frames) and stepped with next/prev."""

    def __init__(self, path: str, fps: float = 30.0):
        p = Path(path)
        self.folder = p if p.is_dir() else None
        if p.is_dir():
            self.files = sorted(f for f in p.iterdir() if f.is_file() and is_image_file(f.name))
        elif p.is_file():
            self.files = [p]
        else:
            raise SourceError(f"{path}: no such image or folder")
        if not self.files:
            raise SourceError(f"{path}: no images in this folder")
        self.pos = 0
        self.period = 1.0 / fps
        self.current: np.ndarray | None = None
        self.skipped: list[str] = []
        self.is_file = True

    @property
    def name(self) -> str:
        return self.files[self.pos].name

    def step(self, delta: int) -> None:
        self.pos = (self.pos + delta) % len(self.files)
        self.current = None

    @property
    def position(self) -> tuple[int, int] | None:
        return (self.pos + 1, len(self.files)) if self.folder is not None else None

    def read(self) -> np.ndarray:
        if self.folder is not None and not self.folder.is_dir():
            raise SourceError(f"{self.folder}: no such folder (moved or deleted?)")
        if self.folder is None and not self.files[0].is_file():
            raise SourceError(f"{self.files[0]}: no such image (moved or deleted?)")
        tries = 0
        while self.current is None:
            try:
                self.current = load_rgb(self.files[self.pos])
            except ImageReadError as e:
                self.skipped.append(str(e))
                tries += 1
                if tries >= len(self.files):
                    raise SourceError(f"no readable image in {self.files[0].parent}") from None
                self.pos = (self.pos + 1) % len(self.files)
        return self.current

    def close(self) -> None:
        pass


def open_source(source: str, loop: bool = True, fps: float | None = None):
    p = Path(source)
    if p.is_dir() or (p.is_file() and is_image_file(p.name)):
        return StillSource(source, fps or 30.0)
    if p.suffix.lower() in VIDEO_SUFFIXES or source.isdigit() or source.startswith("/dev/video") or p.is_file():
        return CaptureSource(source, loop, fps)
    if not p.exists():
        raise SourceError(f"{source}: no such file or folder")
    raise SourceError(f"{source}: not a camera, video, image or folder")


class CaptureThread(threading.Thread):
    """Reads the source as fast as it delivers (paced for files), posts each frame to `frames`; on a failure
    posts a status and retries every `retry_s` seconds, never raising into the UI."""

    def __init__(self, source: str, frames: Mailbox, status: Mailbox, loop: bool = True,
                 fps: float | None = None, retry_s: float = 2.0, generation: int = 0):
        super().__init__(name="dermviewer-capture", daemon=True)
        self.source_name = source
        self.frames, self.status = frames, status
        self.loop, self.fps, self.retry_s = loop, fps, retry_s
        self.stop_event = threading.Event()
        self.retry_event = threading.Event()
        self.src = None
        self.step_request = 0
        self.lock = threading.Lock()
        self.index = 0
        self.generation = generation

    def request_step(self, delta: int) -> None:
        with self.lock:
            self.step_request += delta

    def retry_now(self) -> None:
        self.retry_event.set()

    def stop(self) -> None:
        self.stop_event.set()
        self.retry_event.set()

    def run(self) -> None:
        while not self.stop_event.is_set():
            try:
                self.src = open_source(self.source_name, self.loop, self.fps)
                self.status.put(SourceStatus(True, f"{describe(self.source_name)} open"))
                self._pump()
            except SourceError as e:
                self.status.put(SourceStatus(False, str(e)))
            except Exception as e:  # noqa: BLE001 - a driver fault must not kill the viewer
                self.status.put(SourceStatus(False, f"{describe(self.source_name)}: {type(e).__name__}: {e}"))
            finally:
                if self.src is not None:
                    self.src.close()
                    self.src = None
            self.retry_event.wait(self.retry_s)
            self.retry_event.clear()

    def _pump(self) -> None:
        src = self.src
        next_t = time.perf_counter()
        while not self.stop_event.is_set():
            with self.lock:
                delta, self.step_request = self.step_request, 0
            if delta and isinstance(src, StillSource):
                src.step(delta)
            rgb = src.read()
            if isinstance(src, StillSource) and src.skipped:
                self.status.put(SourceStatus(True, "skipped unreadable image: " + src.skipped.pop(), notice=True))
            self.index += 1
            still = isinstance(src, StillSource)
            self.frames.put(Frame(rgb, time.perf_counter(), self.index, self.source_name,
                                  src.name if still else "", src.position if still else None, self.generation))
            if src.period:
                next_t += src.period
                delay = next_t - time.perf_counter()
                if delay > 0:
                    self.stop_event.wait(delay)
                else:
                    next_t = time.perf_counter()
