"""Read stage: fetch and decode source images into RGB uint8, rejecting bad files with a reason.

Rejects (the ``error`` column; ``status`` is "error"): empty file, file too large, unreadable path,
not an image, too many pixels (checked from the header, before decoding), truncated or corrupt
data, too small. EXIF orientation is applied; every colour mode becomes RGB; animations use frame one.
"""

from __future__ import annotations

import io
import struct
import warnings
from collections import Counter
from pathlib import PurePosixPath
from typing import Any

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from spasem.columns import object_array
from spasem.storage import Store

# the reasons, as they appear in rejects lists and summary.json
EMPTY = "empty file"
TOO_LARGE = "file too large"
UNREADABLE = "unreadable path"
NOT_IMAGE = "not an image"
TOO_MANY_PIXELS = "too many pixels"
CORRUPT = "truncated or corrupt data"
TOO_SMALL = "too small"

ImageFile.LOAD_TRUNCATED_IMAGES = False


class RejectError(Exception):
    """A row that cannot be used; ``reason`` is one of the module's reason constants."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def _to_rgb(im: Image.Image) -> np.ndarray:
    """Convert any PIL mode a camera or editor writes to RGB uint8 (alpha composited on white)."""
    mode = im.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        arr = np.asarray(im).astype(np.float64)
        top = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
        gray = np.clip(np.round(arr * (255.0 / top)), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        hi = 1.0 if arr.max() <= 1.0 else 255.0
        gray = np.clip(np.round(arr * (255.0 / hi)), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    elif mode in ("1", "L", "CMYK", "YCbCr", "LAB", "HSV"):
        im = im.convert("RGB")
    elif mode in ("LA", "La", "PA", "RGBa"):
        im = im.convert("RGBA")
    if im.mode == "RGBA":
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, im).convert("RGB")
    elif im.mode != "RGB":
        im = im.convert("RGB")
    return np.asarray(im, dtype=np.uint8).copy()


def decode_image(data: bytes, max_pixels: int, min_size: int) -> np.ndarray:
    """Decode bytes to RGB uint8 HxWx3 or raise RejectError with the reason."""
    if len(data) == 0:
        raise RejectError(EMPTY)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise RejectError(NOT_IMAGE, "no known image format") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise RejectError(TOO_MANY_PIXELS, str(exc)) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise RejectError(CORRUPT, str(exc)) from None
    with im:
        w, h = im.size
        if w * h > max_pixels:
            raise RejectError(TOO_MANY_PIXELS, f"{w}x{h} = {w * h} > data.max_pixels={max_pixels}")
        try:
            if getattr(im, "n_frames", 1) > 1:
                im.seek(0)
            im.load()
            oriented = ImageOps.exif_transpose(im) or im
            rgb = _to_rgb(oriented)
        except (OSError, SyntaxError, ValueError, EOFError, struct.error) as exc:
            raise RejectError(CORRUPT, str(exc) or type(exc).__name__) from None
    if min(rgb.shape[:2]) < min_size:
        raise RejectError(TOO_SMALL, f"{rgb.shape[1]}x{rgb.shape[0]}, short side below data.min_size={min_size}")
    return rgb


class ReadImages:
    """Stage: ``path`` (relative to the input store) -> ``image``, ``source``, ``status``, ``error``."""

    def __init__(self, store: Store, max_pixels: int, min_size: int, max_bytes: int):
        self.store = store
        self.max_pixels = max_pixels
        self.min_size = min_size
        self.max_bytes = max_bytes
        Image.MAX_IMAGE_PIXELS = max(max_pixels, 1)

    def read_one(self, rel: str) -> np.ndarray:
        try:
            size = self.store.size(rel)
        except (OSError, ValueError) as exc:
            raise RejectError(UNREADABLE, f"{type(exc).__name__}: {exc}") from None
        if size > self.max_bytes:
            raise RejectError(TOO_LARGE, f"{size} bytes > data.max_bytes={self.max_bytes}")
        try:
            data = self.store.read(rel)
        except (OSError, ValueError) as exc:
            raise RejectError(UNREADABLE, f"{type(exc).__name__}: {exc}") from None
        return decode_image(data, self.max_pixels, self.min_size)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        images, status, errors = [], [], []
        for rel in batch["path"]:
            try:
                images.append(self.read_one(str(rel)))
                status.append("ok")
                errors.append("")
            except RejectError as exc:
                images.append(np.zeros((0, 0, 3), np.uint8))
                status.append("error")
                errors.append(str(exc))
        out = dict(batch)
        out["source"] = np.asarray([str(p) for p in batch["path"]], dtype=object)
        out["image"] = object_array(images)
        out["status"] = np.asarray(status, dtype=object)
        out["error"] = np.asarray(errors, dtype=object)
        return out


NO_EXTENSION = "(none)"


def list_images(store: Store, suffixes: tuple[str, ...], exclude: str | None = None) -> tuple[list[str], dict[str, int]]:
    """(image files, {extension: count} of the other files) under ``store``, from one listing.

    Every file is accounted for: it is an input (decoded or rejected with a reason later) or counted by
    its extension (lower case, ``(none)`` without one) for ``summary.json``'s ``skipped_by_extension``.
    ``exclude``: a prefix whose files are no inputs at all (an output folder inside the input).
    """
    images, others = [], Counter()
    for rel in store.list(None):
        if exclude and rel.startswith(exclude):
            continue
        name = rel or PurePosixPath(store.uri).name  # "" is the store itself when the input is one file
        if name.lower().endswith(suffixes):
            images.append(rel)
        else:
            others[PurePosixPath(name).suffix.lower() or NO_EXTENSION] += 1
    return sorted(images), dict(sorted(others.items()))


def reject_reason(error: str) -> str:
    """The reason part of an error message (the text before the first ': ')."""
    return error.split(": ", 1)[0]
