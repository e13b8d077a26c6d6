"""Diffusion stage of ``pipeline.upscale``: LR rows -> ``sr`` (the upscaled image), on an actor pool.

Loads a ``SpatialSemanticSRPipeline`` export once per actor and upscales each row with tiled latent
diffusion (``spasem.model.tiled_diffusion``). Uses the annotation columns when the stages before it made
them (``caption_high``, ``caption_low``, ``phrases``, ``boxes``, and ``clip_lr``/``dino_lr`` with
``upscale.visual_tokens: image``); without them the tiles are
conditioned on ``upscale.prompt`` and no boxes. A row that fails becomes a reject
(``status`` "error", ``error`` "diffuse: ..."); the other rows of the batch go on.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch

from spasem.columns import as_list, object_array, stable_seed
from spasem.config.annotate import ModelsConfig
from spasem.config.upscale import UpscaleConfig
from spasem.encoders import torch_dtype
from spasem.model.sr_pipeline import load_sr_pipeline
from spasem.model.tiled_diffusion import TiledUpscaler
from stages.rows import RowStatus

log = logging.getLogger(__name__)
EMPTY = np.zeros((0, 0, 3), np.uint8)


def _text(batch: dict[str, Any], name: str, n: int) -> list[str]:
    return [str(v) for v in as_list(batch[name])] if name in batch else [""] * n


def _phrases(batch: dict[str, Any], n: int) -> list[list[str]]:
    if "phrases" not in batch:
        return [[] for _ in range(n)]
    return [[str(p) for p in (row if row is not None else [])] for row in as_list(batch["phrases"])]


def _boxes(batch: dict[str, Any], n: int) -> list[np.ndarray]:
    if "boxes" not in batch:
        return [np.zeros((0, 4), np.float32) for _ in range(n)]
    return [np.asarray(b if b is not None else [], np.float32).reshape(-1, 4) for b in as_list(batch["boxes"])]


class Diffuser:
    """Stage: ``lr`` (+ annotation columns) -> ``sr``, ``diffuse_s``; failures become rejects."""

    def __init__(self, upscale: UpscaleConfig, models: ModelsConfig, model_path: str):
        self.cfg = upscale
        self.device = models.device
        if upscale.diffuse.num_gpus > 0 and self.device == "cpu" and torch.cuda.is_available():
            # the actor was given a GPU (Ray sets CUDA_VISIBLE_DEVICES): use it even if models.device was left at cpu
            log.info("upscale.diffuse.num_gpus=%s: running the diffusion stage on cuda", upscale.diffuse.num_gpus)
            self.device = "cuda"
        self.dtype = torch_dtype(models.dtype)
        self.pipe = load_sr_pipeline(model_path, self.device, self.dtype)
        self.upscaler = TiledUpscaler(self.pipe, upscale, self.device, self.dtype)

    def upscale_one(self, lr: np.ndarray, caption_high: str, caption_low: str, phrases: list[str],
                    boxes: np.ndarray, source: str, tokens: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
        seed = stable_seed(self.cfg.seed, source)  # 63 bits: a valid torch seed
        return self.upscaler(lr, caption_high, caption_low, phrases, boxes, seed=seed, image_tokens=tokens)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        lrs = as_list(batch["lr"])
        n = len(lrs)
        rows = RowStatus(batch, n)
        sources = [str(s) for s in as_list(batch.get("source", batch.get("path", [""] * n)))]
        highs, lows = _text(batch, "caption_high", n), _text(batch, "caption_low", n)
        phrases, boxes = _phrases(batch, n), _boxes(batch, n)
        has_tokens = "clip_lr" in batch and "dino_lr" in batch
        clip, dino = (as_list(batch["clip_lr"]), as_list(batch["dino_lr"])) if has_tokens else ([], [])
        outputs, seconds = [], []
        for i, lr in enumerate(lrs):
            t0 = time.perf_counter()
            tokens = (clip[i], dino[i]) if has_tokens else None
            sr = rows.run(i, "diffuse", self.upscale_one, np.asarray(lr, np.uint8), highs[i], lows[i], phrases[i],
                          boxes[i], sources[i], tokens, key=sources[i])
            outputs.append(EMPTY if sr is None else sr)
            seconds.append(time.perf_counter() - t0)
        out = dict(batch)
        out["sr"] = object_array(outputs)
        out["diffuse_s"] = np.asarray(seconds, np.float64)
        out.update(rows.columns())
        return out
