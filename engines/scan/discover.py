"""Finding the images of a folder: every supported suffix in any letter case, symlink loops walked once."""
from __future__ import annotations

import os
from pathlib import Path

from engines.imageio import is_image_file


def find_images(folder: Path, recursive: bool = False) -> tuple[list[Path], list[str]]:
    """(image files sorted by relative path, warnings). Directories are identified by (device, inode), so a
    symlink that points back up the tree is visited once instead of forever."""
    files: list[Path] = []
    warnings: list[str] = []
    seen: set[tuple[int, int]] = set()
    stack = [folder]
    while stack:
        d = stack.pop()
        try:
            st = d.stat()
        except OSError as e:
            warnings.append(f"{d}: cannot open folder ({e.strerror})")
            continue
        if (st.st_dev, st.st_ino) in seen:
            if d != folder:
                warnings.append(f"{d}: skipped, a link back to a folder already scanned")
            continue
        seen.add((st.st_dev, st.st_ino))
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError as e:
            warnings.append(f"{d}: cannot list folder ({e.strerror})")
            continue
        for e in entries:
            try:
                if e.is_dir(follow_symlinks=True):
                    if recursive:
                        stack.append(Path(e.path))
                elif is_image_file(e.name):
                    files.append(Path(e.path))
            except OSError as err:  # a dangling or looping link
                warnings.append(f"{e.path}: skipped ({err.strerror})")
    files.sort(key=lambda p: p.relative_to(folder).as_posix())
    return files, warnings
