"""Rates and latency percentiles over a sliding window, for the on-screen figures and the scripted JSON."""
from __future__ import annotations

import time
from collections import deque

import numpy as np


class Rate:
    def __init__(self, window_s: float = 2.0):
        self.window = window_s
        self.times: deque = deque()
        self.total = 0

    def tick(self, t: float | None = None) -> None:
        t = time.perf_counter() if t is None else t
        self.times.append(t)
        self.total += 1
        while self.times and t - self.times[0] > self.window:
            self.times.popleft()

    def per_s(self, now: float | None = None) -> float:
        """Events per second over the window; decays to 0 once events stop (a dead source reads 0 fps)."""
        now = time.perf_counter() if now is None else now
        while self.times and now - self.times[0] > self.window:
            self.times.popleft()
        if len(self.times) < 2:
            return 0.0
        return (len(self.times) - 1) / max(now - self.times[0], self.times[-1] - self.times[0])


class RunStats:
    """Whole-run figures: first to last event, and all latencies."""

    def __init__(self):
        self.first: dict[str, float] = {}
        self.last: dict[str, float] = {}
        self.count: dict[str, int] = {}
        self.latencies: list[float] = []

    def event(self, kind: str, t: float | None = None) -> None:
        t = time.perf_counter() if t is None else t
        self.first.setdefault(kind, t)
        self.last[kind] = t
        self.count[kind] = self.count.get(kind, 0) + 1

    def rate(self, kind: str) -> float:
        n = self.count.get(kind, 0)
        span = self.last.get(kind, 0) - self.first.get(kind, 0)
        return (n - 1) / span if n > 1 and span > 0 else 0.0

    def latency(self, q: float) -> float | None:
        return float(np.percentile(self.latencies, q)) if self.latencies else None
