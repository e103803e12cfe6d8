"""Reading any photo a clinic may hand us into RGB uint8, or one clear error line.

Grayscale, RGBA, palette, CMYK and 16-bit images become RGB; the EXIF orientation is applied; very large
JPEGs are decoded at a reduced scale (libjpeg's DCT scaling) so memory stays bounded.
"""
from __future__ import annotations

import os
import stat
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif")
# Image types a clinic may hold that this runtime cannot decode: a scan reports them instead of skipping them.
UNSUPPORTED_SUFFIXES = (".heic", ".heif", ".avif", ".jxl", ".jp2", ".dng", ".cr2", ".nef", ".arw", ".raw", ".dcm",
                        ".svg", ".psd")
# JPEGs are decoded at 1/2, 1/4 or 1/8 scale while the result stays at least this large on both sides.
DECODE_TARGET = 1024
# Beyond this many pixels (non-JPEG, or JPEG even after 1/8 scaling) we refuse rather than exhaust memory.
MAX_PIXELS = 160_000_000
# Our own limit (MAX_PIXELS, checked after JPEG draft scaling) replaces Pillow's, which refuses a 20000x20000
# JPEG at open, before the reduced-size decode that makes it harmless.
Image.MAX_IMAGE_PIXELS = None
# An image smaller than this on either side, or this uniform, holds no lesion a model could judge.
MIN_SIDE = 32
MIN_STD = 2.0


class ImageReadError(Exception):
    """A file that cannot be read as an image; str() is one line naming the problem."""


def is_image_file(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(IMAGE_SUFFIXES)


def is_unsupported_image(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(UNSUPPORTED_SUFFIXES)


def looks_like_image(path: str | os.PathLike) -> bool:
    """An image by its name, decodable here or not: what a scan must consider (and never write over)."""
    return is_image_file(path) or is_unsupported_image(path)


def check_content(rgb: np.ndarray, where: str) -> None:
    """Refuse what cannot hold a lesion (a 1x1 pixel, a blank frame) instead of giving it a confident label."""
    h, w = rgb.shape[:2]
    if min(h, w) < MIN_SIDE:
        raise ImageReadError(f"{where}: image too small to hold a lesion ({w}x{h} pixels, need {MIN_SIDE} on each side)")
    step = max(1, max(h, w) // 256)
    if float(rgb[::step, ::step].std()) < MIN_STD:
        raise ImageReadError(f"{where}: image is blank (uniform colour), no lesion to classify")


def _to_rgb(img: Image.Image) -> np.ndarray:
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        if not np.isfinite(a).all():
            raise ValueError("image holds NaN or infinite values")
        hi = float(a.max()) if a.size else 0.0
        if img.mode == "F" and hi <= 1.0:
            top = 1.0  # floating-point images in [0, 1]
        else:
            top = 65535.0 if img.mode.startswith("I;16") or hi > 255 else 255.0
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
        st = p.stat()
    except OSError as e:
        raise ImageReadError(f"{p}: cannot read ({e.strerror or e})") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a FIFO" if stat.S_ISFIFO(st.st_mode) else "a device" if stat.S_ISCHR(st.st_mode) or \
            stat.S_ISBLK(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode) else "a folder" \
            if stat.S_ISDIR(st.st_mode) else "not a regular file"
        raise ImageReadError(f"{p}: not an image file ({kind})")
    if is_unsupported_image(p):
        raise ImageReadError(f"{p}: unsupported image format {p.suffix.upper().lstrip('.')} "
                             f"(convert it to JPEG or PNG)")
    size = st.st_size
    if size == 0:
        raise ImageReadError(f"{p}: empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(p) as img:
                if getattr(img, "n_frames", 1) > 1:
                    img.seek(0)  # an animated GIF/WebP: its first frame
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
