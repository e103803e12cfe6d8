"""The lock that keeps two scans off one results file: the second is refused with one line naming the file and the
holder, and a finished scan leaves no lock file in the clinic's report folder."""
import os

import pytest

from engines.scan.outputs import OutputLock
from engines.scan.results import OutputError


def test_a_second_scan_on_the_same_results_is_refused_while_the_first_holds_it(tmp_path):
    target = tmp_path / "report.csv"
    with OutputLock(target):
        with pytest.raises(OutputError) as e:
            with OutputLock(target):
                pass
        msg = str(e.value)
        assert str(target) in msg and f"pid {os.getpid()}" in msg and "\n" not in msg
        with OutputLock(tmp_path / "other.csv"):  # another results file is free
            pass
    with OutputLock(target):  # and the first one's is free again once it ends
        pass


def test_no_lock_file_is_left_behind_even_after_a_killed_scans_leftover(tmp_path):
    target = tmp_path / "report.csv"
    (tmp_path / ".report.csv.lock").write_text("999999\n")  # what a killed scan leaves: a file, no lock
    with OutputLock(target) as lock:
        assert lock.path.read_text() == f"{os.getpid()}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_lock_file_replaced_under_a_waiting_scan_is_locked_afresh(tmp_path, monkeypatch):
    """The race the removal opens: scan B opens the file, scan A removes it and ends, scan C creates a new one.
    B must not believe it holds the lock on a file no longer there."""
    target = tmp_path / "report.csv"
    lock = OutputLock(target)
    opened = lock._open

    def open_then_lose_it():
        fd = opened()
        if not hasattr(open_then_lose_it, "done"):
            open_then_lose_it.done = True
            lock.path.unlink()  # A's removal, between B's open and B's lock
        return fd

    monkeypatch.setattr(lock, "_open", open_then_lose_it)
    with lock:
        assert lock.path.exists() and lock._names(lock.fd)
        with pytest.raises(OutputError):  # a third scan sees the live lock
            with OutputLock(target):
                pass
    assert not lock.path.exists()
