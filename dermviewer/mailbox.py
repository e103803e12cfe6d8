"""A one-slot mailbox: the writer replaces whatever is there, the reader takes the newest. Stale items are
dropped instead of queued, so a slow reader never builds a backlog and never makes the writer wait."""
from __future__ import annotations

import threading
from typing import Generic, TypeVar

T = TypeVar("T")


class Mailbox(Generic[T]):
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._item: T | None = None
        self._seq = 0

    def put(self, item: T) -> int:
        with self._cond:
            self._item = item
            self._seq += 1
            self._cond.notify_all()
            return self._seq

    def peek(self) -> tuple[int, T | None]:
        """(sequence number, newest item) without waiting; seq 0 means nothing was ever put."""
        with self._cond:
            return self._seq, self._item

    def wait_newer(self, seen: int, timeout: float) -> tuple[int, T | None]:
        """Wait up to `timeout` for an item newer than `seen`; returns (seq, item) or (seen, None)."""
        with self._cond:
            if self._cond.wait_for(lambda: self._seq > seen, timeout):
                return self._seq, self._item
            return seen, None
