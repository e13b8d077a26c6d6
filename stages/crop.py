"""Crop stage: seeded square HR crops cut from each decoded image (one row per crop).

The crop position of (source, crop index) is a pure function of ``data.seed``, so a resumed run
cuts the same crops. Rejected rows pass through as one error row that keeps the source's reason.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from spasem.columns import as_list, object_array, stable_seed, stack_or_objects
from spasem.shards import make_key


def crop_boxes(height: int, width: int, size: int, count: int, seed: int) -> list[tuple[int, int, int, int]]:
    """``count`` random ``size`` x ``size`` boxes ``(x, y, w, h)`` inside a ``width`` x ``height`` image."""
    if height < size or width < size:
        raise ValueError(f"image {width}x{height} is smaller than the {size}px crop")
    rng = np.random.default_rng(seed)
    xs = rng.integers(0, width - size + 1, size=count)
    ys = rng.integers(0, height - size + 1, size=count)
    return [(int(x), int(y), size, size) for x, y in zip(xs, ys, strict=True)]


class RandomCrop:
    """Stage: ``image``, ``source`` -> rows of ``key``, ``source``, ``crop``, ``hr``, ``status``, ``error``."""

    def __init__(self, hr_size: int, crops_per_image: int, seed: int):
        self.hr_size = hr_size
        self.crops = crops_per_image
        self.seed = seed

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        keys, sources, crops, hrs, status, errors = [], [], [], [], [], []
        for image, source, st, err in zip(
            as_list(batch["image"]), batch["source"], batch["status"], batch["error"], strict=True
        ):
            source = str(source)
            if st != "ok":
                keys.append(make_key(source, 0))
                sources.append(source)
                crops.append(np.zeros(4, np.int64))
                hrs.append(np.zeros((self.hr_size, self.hr_size, 3), np.uint8))
                status.append("error")
                errors.append(str(err))
                continue
            seed = stable_seed("crop", self.seed, source)
            for i, (x, y, w, h) in enumerate(crop_boxes(*image.shape[:2], self.hr_size, self.crops, seed)):
                keys.append(make_key(source, i))
                sources.append(source)
                crops.append(np.asarray([x, y, w, h], np.int64))
                hrs.append(np.ascontiguousarray(image[y : y + h, x : x + w]))
                status.append("ok")
                errors.append("")
        return {
            "key": object_array(keys),
            "source": object_array(sources),
            "crop": np.stack(crops) if crops else np.zeros((0, 4), np.int64),
            "hr": stack_or_objects(hrs) if hrs else np.zeros((0, self.hr_size, self.hr_size, 3), np.uint8),
            "status": object_array(status),
            "error": object_array(errors),
        }
