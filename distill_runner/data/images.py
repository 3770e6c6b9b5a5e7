"""Image files to 8-bit pixels: one conversion for the decoded-image store and the on-the-fly loader.

Every file is opened with PIL, turned upright by its EXIF orientation (``ImageOps.exif_transpose``:
phone photos are stored sideways with an orientation tag), then brought to 8-bit ``L``
(grayscale) or ``RGB`` by its mode:

====================  ==========================================================================
PIL mode              what is done
====================  ==========================================================================
``L``, ``RGB``        kept
``1`` (bilevel)       ``L``: 0 and 255
``LA``, ``La``        ``L``: the alpha channel is dropped (the stored gray values are kept, not
                      composited on a background)
``RGBA``, ``RGBa``,   ``RGB``: alpha dropped the same way
``RGBX``
``P``, ``PA``         ``RGB`` through the palette; a palette with a transparent entry (or ``PA``)
                      goes through ``RGBA`` first, then alpha is dropped
``CMYK``, ``YCbCr``,  ``RGB`` by PIL's conversion
``LAB``, ``HSV``
``I;16``, ``I;16B``,  ``L``: 16-bit values scaled by the type's range, 0..65535 -> 0..255 (divide
``I;16L``, ``I;16N``  by 257, rounded). PIL's own ``convert("L")`` clips them, turning a typical
                      16-bit X-ray white.
``I`` (32-bit int)    ``L``: values within 0..65535 are taken as 16-bit data (PIL opens some 16-bit
                      files as ``I``) and divided by 257; otherwise (negative or larger values) the
                      image's own min..max is stretched to 0..255
``F`` (32-bit float)  ``L``: values within 0..1 are taken as intensities (x 255); otherwise the
                      image's min..max is stretched to 0..255 (a constant image gives 0)
====================  ==========================================================================

An animated file (GIF, APNG, multi-page TIFF) gives its first frame, which is what ``Image.open``
shows. A file whose pixels fail to decode (a truncated JPEG or PNG: the header check passes) is
reported by :func:`undecodable` and by the store build, and skipped or refused by the caller.

Docs: docs/guide/datasets.md
"""

from __future__ import annotations

import contextlib

import numpy as np
from PIL import Image, ImageOps

# Modes whose 8-bit form is one gray channel (a header read tells, no decoding needed).
GRAY_MODES = ("1", "L", "LA", "La", "I", "F", "I;16", "I;16B", "I;16L", "I;16N")
UINT16_MAX = 65535


def to_8bit(im: Image.Image) -> Image.Image:
    """``im`` (as opened: first frame) upright and converted to mode ``L`` or ``RGB``; see the table above."""
    im.load()  # decodes the pixels: a truncated file fails here
    with contextlib.suppress(Exception):  # damaged EXIF data: the pixels are fine, keep them as stored
        im = ImageOps.exif_transpose(im)
    mode = im.mode
    if mode in ("L", "RGB"):
        return im
    if mode in ("1", "LA", "La"):
        return im.convert("L")
    if mode.startswith("I;16"):
        return _gray(np.asarray(im, dtype=np.float64) / 257)
    if mode == "I":
        values = np.asarray(im, dtype=np.float64)
        return _gray(values / 257 if values.min() >= 0 and values.max() <= UINT16_MAX else _stretch(values))
    if mode == "F":
        values = np.asarray(im, dtype=np.float64)
        return _gray(values * 255 if values.min() >= 0 and values.max() <= 1 else _stretch(values))
    if mode == "PA" or (mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")  # PIL converts a transparent palette entry correctly only via RGBA
    return im.convert("RGB")


def _stretch(values: np.ndarray) -> np.ndarray:
    """The image's own min..max onto 0..255 (for data with no nominal range)."""
    lo, hi = values.min(), values.max()
    return (values - lo) * (255 / (hi - lo)) if hi > lo else np.zeros_like(values)


def _gray(values: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L")


def load_rgb(path: str) -> Image.Image:
    """The on-the-fly path's loader: the file as 8-bit RGB (grayscale repeated in three channels)."""
    with Image.open(path) as im:
        return to_8bit(im).convert("RGB")


def undecodable(files: list[str]) -> dict[str, str]:
    """``{path: reason}`` for the files whose pixels fail to decode (the header check passes a
    truncated JPEG or PNG; only decoding finds it). One full decode per file, no resizing."""
    bad = {}
    for path in files:
        try:
            with Image.open(path) as im:
                to_8bit(im)
        except Exception as exc:  # OSError "image file is truncated", SyntaxError, ValueError, ...
            bad[path] = f"{type(exc).__name__}: {exc}"
    return bad
