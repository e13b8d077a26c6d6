"""Read and write stages of ``pipeline.upscale``: input files -> ``lr`` rows; ``sr`` rows -> output files.

Outputs keep the input's relative path and format (extension). Pixels end at the writer: it returns
only the small columns (path, status, error, sizes), so nothing image-sized reaches the driver.
"""

from __future__ import annotations

import io
import re
import time
from pathlib import PurePosixPath
from typing import Any

import numpy as np
from PIL import Image

from spasem.columns import as_list, object_array
from spasem.storage import Store
from stages.read import ReadImages
from stages.rows import RowStatus

WRITE_ERROR = "write"
# extension -> (PIL format, save options); quality settings keep the upscale's detail
_FORMATS: dict[str, tuple[str, dict[str, Any]]] = {
    ".png": ("PNG", {"compress_level": 6}),
    ".jpg": ("JPEG", {"quality": 95, "subsampling": 0}),
    ".jpeg": ("JPEG", {"quality": 95, "subsampling": 0}),
    ".webp": ("WEBP", {"quality": 95, "method": 4}),
    ".bmp": ("BMP", {}),
    ".tif": ("TIFF", {"compression": "tiff_deflate"}),
    ".tiff": ("TIFF", {"compression": "tiff_deflate"}),
    # a GIF input is upscaled from its first frame and written as a one-frame GIF (256 colours, as GIF
    # holds no more): keep the format the user's files have; convert to PNG first for full colour
    ".gif": ("GIF", {}),
}


def encode_like(image: np.ndarray, rel: str) -> bytes:
    """RGB uint8 ``image`` encoded in the format that ``rel``'s extension names."""
    suffix = PurePosixPath(rel).suffix.lower()
    if suffix not in _FORMATS:
        raise ValueError(f"no output format for extension {suffix!r} of {rel}; supported: {', '.join(_FORMATS)}")
    fmt, options = _FORMATS[suffix]
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format=fmt, **options)
    return buf.getvalue()


def sample_key(rel: str) -> str:
    """A WebDataset-style key from a relative path (no dots), as the annotation stages expect."""
    return re.sub(r"[^A-Za-z0-9_/-]", "_", rel).replace("/", "__")


class ReadLR:
    """Stage: ``path`` -> ``key``, ``source``, ``lr`` (RGB uint8), ``in_pixels``, ``status``, ``error``."""

    def __init__(self, store: Store, max_pixels: int, min_size: int, max_bytes: int):
        self.read = ReadImages(store, max_pixels, min_size, max_bytes)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = self.read(batch)
        images = as_list(out.pop("image"))
        out["lr"] = object_array(images)
        out["key"] = object_array([sample_key(str(p)) for p in as_list(batch["path"])])
        out["in_pixels"] = np.asarray([int(im.shape[0] * im.shape[1]) for im in images], np.int64)
        return out


class WriteOutputs:
    """Stage: ``sr`` -> the file ``path`` in the output store; returns the row without pixels."""

    PIXELS = ("lr", "sr")

    def __init__(self, store: Store):
        self.store = store

    def _write(self, path: str, sr: np.ndarray) -> bool:
        self.store.write(path, encode_like(np.asarray(sr, np.uint8), path))
        return True

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        paths = [str(p) for p in as_list(batch["path"])]
        rows = RowStatus(batch, len(paths))
        out_pixels, widths, heights, seconds = [], [], [], []
        for i, sr in enumerate(as_list(batch["sr"])):
            t0 = time.perf_counter()
            done = rows.run(i, WRITE_ERROR, self._write, paths[i], sr, catch=(OSError, ValueError), key=paths[i])
            h, w = (int(sr.shape[0]), int(sr.shape[1])) if done else (0, 0)
            seconds.append(time.perf_counter() - t0)
            out_pixels.append(h * w)
            widths.append(w)
            heights.append(h)
        keep = {k: v for k, v in batch.items() if k not in self.PIXELS and k in _SMALL_COLUMNS}
        keep.update(
            path=object_array(paths),
            **rows.columns(),
            out_pixels=np.asarray(out_pixels, np.int64),
            width=np.asarray(widths, np.int64),
            height=np.asarray(heights, np.int64),
            write_s=np.asarray(seconds, np.float64),
        )
        return keep


# the columns that come back to the driver (everything else stays in the pipeline)
_SMALL_COLUMNS = ("path", "source", "in_pixels", "diffuse_s", "caption_high", "caption_low")
