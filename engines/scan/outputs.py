"""What a scan may write, decided before any work: never an input, never another file's content, never two outputs
on one path, and never a results file another scan is writing (an exclusive lock held for the whole scan)."""
from __future__ import annotations

import os
from pathlib import Path

from engines.imageio import looks_like_image
from engines.scan.results import ISIC_COLUMNS, OutputError, is_results_file, sidecar

HTML_MARKER = "<h1>DermEdge scan report</h1>"


def _same(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _is_our_html(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return HTML_MARKER in f.read(4096)
    except OSError:
        return False


def _is_isic(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.readline().strip() == ",".join(ISIC_COLUMNS)
    except OSError:
        return False


def _named(out: Path, html: Path | None, isic: Path | None) -> list[tuple[str, Path]]:
    return [(flag, p) for flag, p in (("--out", out), ("--html", html), ("--isic", isic)) if p is not None]


def check_paths(out: Path, html: Path | None, isic: Path | None, inputs: list[Path]) -> None:
    """Before anything is created: no output on an input, an image name, a folder or another output."""
    named = _named(out, html, isic)
    for i, (fa, a) in enumerate(named):
        for fb, b in named[i + 1:]:
            if _same(a, b):
                raise OutputError(f"{a}: given as both {fa} and {fb}; each output needs its own file")
        if _same(a, sidecar(out)):
            raise OutputError(f"{a}: is where the results' sidecar goes; pick another {fa}")
    resolved_inputs = {p.resolve() for p in inputs}
    for flag, p in named:
        if looks_like_image(p.name):
            raise OutputError(f"{p}: {flag} names an image file; refusing to write results over an image")
        if p.resolve() in resolved_inputs:
            raise OutputError(f"{p}: {flag} is one of the images being scanned; refusing to overwrite it")
        if p.is_dir():
            raise OutputError(f"{p}: is a folder, not a file")


def check_existing(out: Path, html: Path | None, isic: Path | None, resume: bool, overwrite: bool) -> None:
    """Under the lock: what is already there may be replaced only when dermscan wrote it and the user said so."""
    if out.exists():
        if not is_results_file(out):
            raise OutputError(f"{out}: exists and is not a dermscan results file; refusing to replace it")
        if not resume and not overwrite:
            raise OutputError(f"{out}: already holds results; pass --resume to continue that scan or "
                              f"--overwrite to replace it")
    for flag, p, ours in (("--html", html, _is_our_html), ("--isic", isic, _is_isic)):
        if p is not None and p.exists() and not ours(p):
            raise OutputError(f"{p}: exists and is not a {flag[2:].upper()} file written by dermscan; "
                              f"refusing to replace it")
    for _, p in _named(out, html, isic):
        _check_writable(p)


def _check_writable(path: Path) -> None:
    probe = path.parent if str(path.parent) else Path(".")
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise OutputError(f"{path}: cannot write here (folder {probe} is not writable)")
    if path.exists() and not os.access(path, os.W_OK):
        raise OutputError(f"{path}: file is not writable")


class OutputLock:
    """An exclusive, non-blocking lock beside the results file (`.NAME.lock`, holding the owner's pid), removed when
    the scan ends so a clinic's report folder keeps only its reports. The kernel drops the lock when the process
    dies, so a killed scan's leftover file never blocks the next one."""

    def __init__(self, target: Path):
        self.target = target
        self.path = target.with_name(f".{target.name}.lock")
        self.fd: int | None = None

    def __enter__(self) -> "OutputLock":
        for _ in range(10):
            fd = self._open()
            if not _try_lock(fd):
                try:
                    pid = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
                finally:
                    os.close(fd)
                raise OutputError(f"{self.target}: another dermscan (pid {pid}) is writing it; wait for it to "
                                  f"finish or pick another --out")
            if self._names(fd):
                break
            # The scan before this one removed the file between our open and our lock: lock the new one.
            _unlock(fd)
            os.close(fd)
        else:
            raise OutputError(f"{self.target}: could not lock {self.path.name}: it keeps being replaced")
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is None:
            return
        try:  # removed while still held, so no one locks a file that is about to disappear
            self.path.unlink()
        except OSError:
            pass  # Windows does not remove an open file: it stays, and the next scan locks it again
        _unlock(self.fd)
        os.close(self.fd)
        self.fd = None

    def _open(self) -> int:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise OutputError(f"{self.target}: cannot write here ({e.strerror or e})") from None

    def _names(self, fd: int) -> bool:
        """Whether the lock file's path still names the file this descriptor holds. Windows removes no open file,
        so there it always does (and its inode numbers are not to be relied on)."""
        if os.name == "nt":
            return True
        try:
            held, named = os.fstat(fd), os.stat(self.path)
        except OSError:
            return False
        return (held.st_dev, held.st_ino) == (named.st_dev, named.st_ino)


try:
    import fcntl

    def _try_lock(fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False

    def _unlock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)
except ImportError:  # Windows
    import msvcrt

    def _try_lock(fd: int) -> bool:
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False

    def _unlock(fd: int) -> None:
        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
