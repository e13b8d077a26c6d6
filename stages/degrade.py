"""Degrade stage: HR crops -> USM-sharpened HR targets and Real-ESRGAN second-order degraded LR images,
seeded per sample (the chain itself: ``spasem.degrade.chain``)."""

from __future__ import annotations

import json
from typing import Any

import cv2
import numpy as np

from spasem.columns import as_list, object_array, stack_or_objects
from spasem.degrade.chain import sample_seed, synthesize
from spasem.degrade.params import sample_params
from stages.rows import RowStatus


class Degrade:
    """Stage: ``key``, ``hr`` (+ ``status``/``error``) -> ``hr`` sharpened, adds ``lr``, ``seed``, ``degradation``.

    ``hr`` becomes the training target: the crop after the preset's unsharp masking (unchanged with
    ``degradation.usm: false``), from which the LR is degraded. Other columns pass through. Rows whose status is not "ok" get a zero LR and degradation
    "null"; a row that fails here becomes status "error" with error "degrade: <message>", and the
    rest of the batch goes on.
    """

    def __init__(self, data_cfg: Any, degradation_cfg: Any):
        self.scale = int(data_cfg.scale)
        self.base_seed = int(data_cfg.seed)
        self.lr_size = int(data_cfg.hr_size) // self.scale
        self.preset = str(degradation_cfg.preset)
        self.usm = degradation_cfg.usm
        sample_params(self.preset, np.random.default_rng(0))  # fail at set-up on an unknown preset
        # Ray gives each task its own CPU share; OpenCV's own thread pool would oversubscribe it
        cv2.setNumThreads(1)

    def _blank(self, hr: Any) -> np.ndarray:
        """The zero LR of a row that was not degraded: HR-shaped when it can be, so columns stack."""
        shape = np.shape(hr)
        if len(shape) == 3 and shape[0] >= self.scale and shape[1] >= self.scale:
            return np.zeros((shape[0] // self.scale, shape[1] // self.scale, 3), np.uint8)
        return np.zeros((self.lr_size, self.lr_size, 3), np.uint8)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        keys = [str(k) for k in as_list(batch["key"])]
        hrs = as_list(batch["hr"])
        rows = RowStatus(batch, len(keys))
        targets, lrs, seeds, records = [], [], [], []
        for i, (key, hr) in enumerate(zip(keys, hrs, strict=True)):
            seed = sample_seed(self.base_seed, key)
            result = rows.run(i, "degrade", synthesize, np.asarray(hr), self.preset, seed, self.scale, self.usm,
                              key=key)
            if result is None:
                targets.append(hr)
                lrs.append(self._blank(hr))
                records.append("null")
            else:
                targets.append(result[0])
                lrs.append(result[1])
                records.append(json.dumps(result[2].to_record()))
            seeds.append(seed)
        out = dict(batch)
        if targets:
            out["hr"] = stack_or_objects(targets)
        out["lr"] = stack_or_objects(lrs) if lrs else np.zeros((0, self.lr_size, self.lr_size, 3), np.uint8)
        out["seed"] = np.asarray(seeds, dtype=np.int64)
        out["degradation"] = object_array(records)
        out.update(rows.columns())
        return out
