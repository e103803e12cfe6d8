"""Real files of every awkward kind a clinic folder may hold, made from real HAM10000 images."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image


def make_bad_folder(folder: Path, source: Path) -> dict[str, str]:
    """Writes the files; returns name -> 'ok' (must be classified) or 'error' (must be reported)."""
    folder.mkdir(parents=True, exist_ok=True)
    src = Image.open(source).convert("RGB")
    raw = source.read_bytes()
    expect: dict[str, str] = {}

    (folder / "zero_bytes.jpg").write_bytes(b"")
    expect["zero_bytes.jpg"] = "error"
    (folder / "truncated.jpg").write_bytes(raw[: len(raw) // 2])
    expect["truncated.jpg"] = "error"
    (folder / "notes.jpg").write_text("this is a text file saved with a .jpg name\n")
    expect["notes.jpg"] = "error"

    src.convert("L").save(folder / "grayscale.png")
    rgba = src.convert("RGBA")
    rgba.putalpha(200)
    rgba.save(folder / "rgba.png")
    src.convert("P", palette=Image.Palette.ADAPTIVE, colors=64).save(folder / "palette.png")
    src.convert("CMYK").save(folder / "cmyk.jpg", quality=92)
    g16 = (np.asarray(src.convert("L"), dtype=np.uint16) * 257)
    Image.fromarray(g16).save(folder / "sixteen_bit.tif")
    src.save(folder / "UPPER_CASE.JPEG")
    src.save(folder / "bitmap.bmp")
    # EXIF orientation 6: stored landscape, shown rotated 90 degrees clockwise (portrait).
    exif = Image.Exif()
    exif[0x0112] = 6
    src.save(folder / "exif_rotated.jpg", exif=exif.tobytes())
    for name in ("grayscale.png", "rgba.png", "palette.png", "cmyk.jpg", "sixteen_bit.tif", "UPPER_CASE.JPEG",
                 "bitmap.bmp", "exif_rotated.jpg"):
        expect[name] = "ok"
    return expect


def make_large_jpeg(path: Path, source: Path, size=(12000, 9000)) -> None:
    """A 12000x9000 JPEG (108 megapixels) made by tiling a real lesion image."""
    src = np.asarray(Image.open(source).convert("RGB"))
    reps = (size[1] // src.shape[0] + 1, size[0] // src.shape[1] + 1, 1)
    big = np.tile(src, reps)[: size[1], : size[0]]
    buf = io.BytesIO()
    Image.fromarray(big).save(buf, format="JPEG", quality=80)
    path.write_bytes(buf.getvalue())
