"""Crop stage: seeded square HR crops cut from each decoded image (one row per crop).

The crop position and mirroring of (source, crop index) are pure functions of ``data.seed``, so a
resumed run cuts the same crops. As the papers' datasets (SeeSR's/BasicSR's ``RealESRGANDataset``,
which XPSR's ``make_train.py``, Real-ESRGAN and StableSR use): each crop is mirrored left-right with
probability 1/2 (``use_hflip``; ``data.hflip``), and an image smaller than the crop (only when
``data.min_size`` lets one through) is first padded at the bottom and right by reflection
(``cv2.copyMakeBorder(..., BORDER_REFLECT_101)``). Rejected rows pass through as one error row that
keeps the source's reason.
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np

from spasem.columns import as_list, object_array, stable_seed, stack_or_objects
from spasem.shards import make_key


def crop_boxes(height: int, width: int, size: int, count: int, seed: int) -> list[tuple[int, int, int, int]]:
    """``count`` random ``size`` x ``size`` boxes ``(x, y, w, h)`` inside a ``width`` x ``height`` image
    (padded first to at least ``size`` on each side: see :func:`pad_to`)."""
    height, width = max(height, size), max(width, size)
    rng = np.random.default_rng(seed)
    xs = rng.integers(0, width - size + 1, size=count)
    ys = rng.integers(0, height - size + 1, size=count)
    return [(int(x), int(y), size, size) for x, y in zip(xs, ys, strict=True)]


def pad_to(image: np.ndarray, size: int) -> np.ndarray:
    """``image`` padded at the bottom and right to at least ``size`` x ``size`` by reflection (reflect-101,
    as ``RealESRGANDataset`` pads images smaller than its crop); unchanged when it is large enough."""
    pad_h, pad_w = max(0, size - image.shape[0]), max(0, size - image.shape[1])
    if not (pad_h or pad_w):
        return image
    return cv2.copyMakeBorder(np.ascontiguousarray(image), 0, pad_h, 0, pad_w, cv2.BORDER_REFLECT_101)


def crop_flips(count: int, seed: int) -> list[bool]:
    """Whether each of ``count`` crops is mirrored: probability 1/2 each, from its own seed stream."""
    return [bool(f) for f in np.random.default_rng(seed).random(count) < 0.5]


class RandomCrop:
    """Stage: ``image``, ``source`` -> rows of ``key``, ``source``, ``crop``, ``flip``, ``hr``, ``status``, ``error``."""

    def __init__(self, hr_size: int, crops_per_image: int, seed: int, hflip: bool = True):
        self.hr_size = hr_size
        self.crops = crops_per_image
        self.seed = seed
        self.hflip = hflip

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        keys, sources, crops, flips, hrs, status, errors = [], [], [], [], [], [], []
        for image, source, st, err in zip(
            as_list(batch["image"]), batch["source"], batch["status"], batch["error"], strict=True
        ):
            source = str(source)
            if st != "ok":
                keys.append(make_key(source, 0))
                sources.append(source)
                crops.append(np.zeros(4, np.int64))
                flips.append(False)
                hrs.append(np.zeros((self.hr_size, self.hr_size, 3), np.uint8))
                status.append("error")
                errors.append(str(err))
                continue
            seed = stable_seed("crop", self.seed, source)
            mirror = crop_flips(self.crops, stable_seed("flip", self.seed, source)) if self.hflip else [False] * self.crops
            padded = pad_to(image, self.hr_size)
            for i, (x, y, w, h) in enumerate(crop_boxes(*image.shape[:2], self.hr_size, self.crops, seed)):
                keys.append(make_key(source, i))
                sources.append(source)
                crops.append(np.asarray([x, y, w, h], np.int64))
                flips.append(mirror[i])
                hr = padded[y : y + h, x : x + w]
                hrs.append(np.ascontiguousarray(hr[:, ::-1] if mirror[i] else hr))
                status.append("ok")
                errors.append("")
        return {
            "key": object_array(keys),
            "source": object_array(sources),
            "crop": np.stack(crops) if crops else np.zeros((0, 4), np.int64),
            "flip": np.asarray(flips, dtype=bool),
            "hr": stack_or_objects(hrs) if hrs else np.zeros((0, self.hr_size, self.hr_size, 3), np.uint8),
            "status": object_array(status),
            "error": object_array(errors),
        }
