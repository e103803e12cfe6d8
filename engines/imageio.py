"""Reading any photo a clinic may hand us into RGB uint8, or one clear error line.

Grayscale, RGBA, palette, CMYK and 16-bit images become RGB; the EXIF orientation is applied; very large
JPEGs are decoded at a reduced scale (libjpeg's DCT scaling) so memory stays bounded.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
# JPEGs are decoded at 1/2, 1/4 or 1/8 scale while the result stays at least this large on both sides.
DECODE_TARGET = 1024
# Beyond this many pixels (non-JPEG, or JPEG even after 1/8 scaling) we refuse rather than exhaust memory.
MAX_PIXELS = 160_000_000


class ImageReadError(Exception):
    """A file that cannot be read as an image; str() is one line naming the problem."""


def is_image_file(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(IMAGE_SUFFIXES)


def _to_rgb(img: Image.Image) -> np.ndarray:
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        g = np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(g[:, :, None], 3, axis=2))
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        # Transparent areas become white, as a viewer would show them, instead of arbitrary colour.
        base = Image.new("RGB", img.size, (255, 255, 255))
        base.paste(img.convert("RGBA"), mask=img.convert("RGBA").split()[3])
        img = base
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img, dtype=np.uint8).copy()


def load_rgb(path: str | os.PathLike) -> np.ndarray:
    """Decode an image file into an RGB uint8 HxWx3 array, or raise ImageReadError with one line."""
    p = Path(path)
    try:
        size = p.stat().st_size
    except OSError as e:
        raise ImageReadError(f"{p}: cannot read ({e.strerror or e})") from None
    if size == 0:
        raise ImageReadError(f"{p}: empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(p) as img:
                if img.format == "JPEG":
                    img.draft("RGB", (DECODE_TARGET, DECODE_TARGET))
                if img.width * img.height > MAX_PIXELS:
                    raise ImageReadError(f"{p}: image too large ({img.width}x{img.height} pixels)")
                img.load()
                img = ImageOps.exif_transpose(img) or img
                rgb = _to_rgb(img)
    except ImageReadError:
        raise
    except PermissionError:
        raise ImageReadError(f"{p}: permission denied") from None
    except UnidentifiedImageError:
        raise ImageReadError(f"{p}: not an image (unrecognised or corrupt format)") from None
    except Image.DecompressionBombError as e:
        raise ImageReadError(f"{p}: image too large ({e})") from None
    except (OSError, SyntaxError, ValueError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "truncated" in msg.lower():
            msg = "truncated or damaged image data"
        raise ImageReadError(f"{p}: cannot decode ({msg})") from None
    if rgb.ndim != 3 or rgb.shape[0] < 1 or rgb.shape[1] < 1:
        raise ImageReadError(f"{p}: decoded to an empty image")
    return rgb
