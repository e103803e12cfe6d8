"""The inference worker: takes the newest frame, classifies the guided region, smooths, posts the result."""
from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass

import cv2
import numpy as np

from dermviewer.mailbox import Mailbox
from dermviewer.sources import Frame
from engines.engine import Engine


@dataclass(frozen=True)
class Guide:
    """The classified region: a centred square (or the circle inscribed in it) as a share of the frame's short side."""
    scale: float = 0.8
    shape: str = "circle"  # circle | square

    def box(self, h: int, w: int) -> tuple[int, int, int, int]:
        s = max(8, int(min(h, w) * min(max(self.scale, 0.1), 1.0)))
        top, left = (h - s) // 2, (w - s) // 2
        return top, left, s, s


@dataclass(frozen=True)
class Result:
    frame_index: int
    probs: np.ndarray  # smoothed, calibrated
    raw_probs: np.ndarray  # this frame alone
    label: str
    confidence: float
    melanoma_flag: bool
    mel_score: float  # of the smoothed probabilities: what the flag compares with the threshold
    heat_rgba: np.ndarray | None  # colour heat map of the region, RGBA uint8, region-sized
    heat_class: str | None  # the class the heat map explains: melanoma while the alert is up, else the top label
    heat_flat: bool  # no place in the region stands out for that class (the map is shown empty, not rescaled)
    box: tuple[int, int, int, int]
    latency_ms: float  # from frame capture to this result
    infer_ms: float
    generation: int = 0  # the source opening of its frame


class Smoother:
    """Mean of the last n probability vectors (n = 1 turns smoothing off)."""

    def __init__(self, n: int = 5):
        self.buf: deque = deque(maxlen=max(1, n))

    def set_n(self, n: int) -> None:
        self.buf = deque(self.buf, maxlen=max(1, n))

    def __call__(self, p: np.ndarray) -> np.ndarray:
        self.buf.append(p)
        return np.mean(self.buf, axis=0)


def heat_overlay(cam: np.ndarray, size: int, circle: bool = True) -> np.ndarray:
    """Class activation map -> RGBA overlay of the region: colour by activation, opacity rising with it."""
    heat = np.clip(cv2.resize(cam.astype(np.float32), (size, size), interpolation=cv2.INTER_CUBIC), 0, 1)
    colour = cv2.applyColorMap((heat * 255).astype(np.uint8), cv2.COLORMAP_JET)
    alpha = (heat * 150).astype(np.uint8)
    if circle:
        yy, xx = np.mgrid[:size, :size]
        alpha[(yy - size / 2 + 0.5) ** 2 + (xx - size / 2 + 0.5) ** 2 > (size / 2) ** 2] = 0
    return np.ascontiguousarray(np.dstack([cv2.cvtColor(colour, cv2.COLOR_BGR2RGB), alpha]))


class InferenceThread(threading.Thread):
    def __init__(self, engine: Engine, frames: Mailbox, results: Mailbox, smoothing: int = 5):
        super().__init__(name="dermviewer-inference", daemon=True)
        self.engine = engine
        self.frames, self.results = frames, results
        self.smoother = Smoother(smoothing)
        self.guide = Guide()
        self.heatmap = True
        self.paused = False
        self.stop_event = threading.Event()
        self.error: str | None = None
        self.count = 0

    def stop(self) -> None:
        self.stop_event.set()

    def run(self) -> None:
        seen = 0
        mel = self.engine.bundle.mel_index
        while not self.stop_event.is_set():
            seq, frame = self.frames.wait_newer(seen, 0.1)
            if frame is None or self.paused:
                continue
            seen = seq
            try:
                self.results.put(self._classify(frame, mel))
                self.error = None
            except Exception as e:  # noqa: BLE001 - a bad frame must not end inference
                self.error = f"inference failed: {type(e).__name__}: {e}"

    def _classify(self, frame: Frame, mel: int) -> Result:
        h, w = frame.rgb.shape[:2]
        box = self.guide.box(h, w)
        top, left, s, _ = box
        region = frame.rgb[top:top + s, left:left + s]
        t0 = time.perf_counter()
        pred = self.engine.predict_one(np.ascontiguousarray(region))
        infer_ms = (time.perf_counter() - t0) * 1000
        probs = self.smoother(pred.probs)
        i = int(np.argmax(probs))
        score = float(self.engine.bundle.mel_score(probs))
        flag = score >= self.engine.bundle.mel_threshold
        explained = mel if flag else i
        heat, heat_class, flat = None, None, False
        if self.heatmap and pred.cams is not None:
            m = pred.heat(explained)
            flat = not m.any()
            heat = None if flat else heat_overlay(m, s, self.guide.shape == "circle")
            heat_class = self.engine.bundle.classes[explained]
        self.count += 1
        return Result(frame.index, probs, pred.probs, self.engine.bundle.classes[i], float(probs[i]), flag, score, heat,
                      heat_class, flat, box, (time.perf_counter() - frame.t_capture) * 1000, infer_ms,
                      frame.generation)
