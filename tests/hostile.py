"""A hostile folder for dermscan: awkward names, types and sizes, made from a real HAM10000 image.

`make_hostile_folder` returns, for every file (or folder) it made, what a scan must record: ("ok", None), or
("error", a phrase the one-line error must contain). Names are bytes where the file system allows any bytes.
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class Expect:
    status: str  # ok | error
    phrase: str | None = None  # in the error, for error rows


def _csv_name(raw: bytes) -> str:
    """The name as the results CSV shows it: undecodable bytes as \\xNN."""
    return os.fsdecode(raw).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def make_hostile_folder(folder: Path, source: Path) -> dict[str, Expect]:
    folder.mkdir(parents=True, exist_ok=True)
    src = Image.open(source).convert("RGB")
    arr = np.asarray(src)
    jpeg = io.BytesIO()
    src.save(jpeg, format="JPEG", quality=90)
    expect: dict[str, Expect] = {}

    def put(name: str | bytes, data: bytes, outcome: Expect) -> None:
        raw = name if isinstance(name, bytes) else name.encode()
        with open(os.path.join(os.fsencode(folder), raw), "wb") as f:
            f.write(data)
        expect[_csv_name(raw)] = outcome

    # names
    put(b"lesion_\xff\xfe.jpg", jpeg.getvalue(), Expect("ok"))  # not valid UTF-8
    put("carriage\rreturn.jpg", jpeg.getvalue(), Expect("ok"))
    put("line\nfeed.jpg", jpeg.getvalue(), Expect("ok"))
    put('quote"and,comma.jpg', jpeg.getvalue(), Expect("ok"))
    for name in ("=HYPERLINK(1).jpg", "+cmd.jpg", "-2.jpg", "@sum.jpg", "'apostrophe.jpg"):
        put(name, jpeg.getvalue(), Expect("ok"))
    put("ünïcödé 皮肤.jpg", jpeg.getvalue(), Expect("ok"))

    # formats
    for fmt, name in (("GIF", "lesion.gif"), ("WEBP", "lesion.webp")):
        buf = io.BytesIO()
        src.save(buf, format=fmt)
        put(name, buf.getvalue(), Expect("ok"))
    buf = io.BytesIO()
    frames = [src, src.rotate(90)]
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    put("animated.gif", buf.getvalue(), Expect("ok"))
    put("phone_photo.HEIC", b"\x00\x00\x00\x18ftypheic" + b"\x00" * 64, Expect("error", "unsupported image format"))
    put("float_unit.tif", _float_tiff(arr), Expect("ok"))

    # sizes and content
    put("one_pixel.png", _png(np.full((1, 1, 3), 128, np.uint8)), Expect("error", "too small"))
    put("blank.png", _png(np.full((150, 200, 3), 255, np.uint8)), Expect("error", "blank"))
    thin = np.tile(np.linspace(0, 255, 40000, dtype=np.uint8)[:, None, None], (1, 1, 3))
    put("thin_1x40000.png", _png(thin), Expect("error", "too small"))
    ramp = np.tile(np.linspace(0, 255, 40000, dtype=np.uint8)[:, None, None], (1, 40, 3))
    put("tall_40x40000.png", _png(ramp), Expect("ok"))

    # not regular files
    os.mkfifo(folder / "pipe.jpg")
    expect["pipe.jpg"] = Expect("error", "FIFO")
    os.symlink("/dev/urandom", folder / "urandom.jpg")
    expect["urandom.jpg"] = Expect("error", "device")
    os.symlink(folder / "nowhere.jpg", folder / "dangling.jpg")
    expect["dangling.jpg"] = Expect("error", "cannot read")

    # folders: a real one, a link to it (files recorded under the real path once), a loop
    (folder / "real").mkdir()
    (folder / "real" / "inside.jpg").write_bytes(jpeg.getvalue())
    expect["real/inside.jpg"] = Expect("ok")
    os.symlink("real", folder / "a_link")  # sorts before "real": walked after it all the same
    os.symlink("..", folder / "real" / "up")
    # two files with one stem in different folders (ISIC ids must differ)
    (folder / "b").mkdir()
    (folder / "b" / "lesion.gif").write_bytes(_gif(src))
    expect["b/lesion.gif"] = Expect("ok")
    return expect


def _png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def _gif(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="GIF")
    return buf.getvalue()


def _float_tiff(rgb: np.ndarray) -> bytes:
    """A single-channel 32-bit float TIFF with values in [0, 1] (as scientific cameras save them)."""
    gray = rgb.mean(axis=2).astype(np.float32) / 255.0
    buf = io.BytesIO()
    Image.fromarray(gray).save(buf, format="TIFF")
    return buf.getvalue()


def make_huge_jpeg(path: Path, side: int = 20000) -> None:
    """A side x side grayscale JPEG (400 megapixels at 20000): past Pillow's own decompression-bomb limit."""
    ramp = np.linspace(0, 255, side, dtype=np.float32)
    img = ((ramp[:, None] + ramp[None, :]) / 2).astype(np.uint8)
    Image.fromarray(img).save(path, format="JPEG", quality=50)
