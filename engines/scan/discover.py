"""Finding what a scan must consider: every image file of a folder (supported or not), and the folders it
could not open. Real folders are walked before symlinked ones, and each folder is walked once, so a file is
recorded under its real place in the tree and a loop is reported at the link that makes it."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from engines.imageio import looks_like_image


@dataclass
class Found:
    files: list[Path] = field(default_factory=list)  # to scan, sorted by relative path
    bad_folders: list[tuple[Path, str]] = field(default_factory=list)  # (folder, why it could not be read)
    warnings: list[str] = field(default_factory=list)
    other_files: int = 0  # files that are not images (notes, CSVs, ...), left out


def find_images(folder: Path, recursive: bool = False) -> Found:
    found = Found()
    seen: set[tuple[int, int]] = set()
    real: list[Path] = [folder]
    linked: list[Path] = []
    while real or linked:
        d = real.pop() if real else linked.pop()
        try:
            st = d.stat()
        except OSError as e:
            found.bad_folders.append((d, f"cannot open folder ({e.strerror})"))
            continue
        if (st.st_dev, st.st_ino) in seen:
            found.warnings.append(f"{d}: skipped, a link to a folder already scanned")
            continue
        seen.add((st.st_dev, st.st_ino))
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError as e:
            found.bad_folders.append((d, f"cannot list folder ({e.strerror})"))
            continue
        for e in entries:
            try:
                if e.is_dir(follow_symlinks=True):
                    if recursive:
                        (linked if e.is_symlink() else real).append(Path(e.path))
                elif looks_like_image(e.name):
                    found.files.append(Path(e.path))
                else:
                    found.other_files += 1
            except OSError as err:  # a dangling or looping link
                found.warnings.append(f"{e.path}: skipped ({err.strerror})")
    found.files.sort(key=lambda p: p.relative_to(folder).as_posix())
    return found
