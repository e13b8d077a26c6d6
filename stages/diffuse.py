"""Diffusion stage of ``pipeline.upscale``: LR rows -> ``sr`` (the upscaled image), on an actor pool.

Loads a ``SpatialSemanticSRPipeline`` export once per actor and upscales each row with tiled latent
diffusion (``stages.tiled_diffusion``). Uses the annotation columns when the stages before it made
them (``caption_high``, ``caption_low``, ``phrases``, ``boxes``, and ``clip_lr``/``dino_lr`` with
``upscale.visual_tokens: image``); without them the tiles are
conditioned on ``upscale.prompt`` and no boxes. A row that fails becomes a reject
(``status`` "error", ``error`` "diffuse: ..."); the other rows of the batch go on.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config import Config
from stages.columns import as_list, object_array, stable_seed
from stages.tiled_diffusion import TiledUpscaler

log = logging.getLogger(__name__)
EMPTY = np.zeros((0, 0, 3), np.uint8)


def load_sr_pipeline(path: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> Any:
    """A saved ``SpatialSemanticSRPipeline`` (``save_pretrained`` folder), on ``device`` in ``dtype``."""
    import training.model  # noqa: F401  (diffusers loads the ControlNet class only from imported modules)
    from training.sr_pipeline import SpatialSemanticSRPipeline

    if not Path(path, "model_index.json").is_file():
        raise FileNotFoundError(
            f"{path} is not a saved SpatialSemanticSRPipeline (no model_index.json); pass --model with "
            "a training export (RUN_URI/export) or leave it out to use the untrained tiny-profile build"
        )
    pipe = SpatialSemanticSRPipeline.from_pretrained(path, dtype=dtype)
    pipe.to(device)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    return pipe


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

    def __init__(self, cfg: Config, model_path: str):
        from stages.features import torch_dtype

        self.cfg = cfg
        self.device = cfg.models.device
        if cfg.upscale.diffuse.num_gpus > 0 and self.device == "cpu" and torch.cuda.is_available():
            # the actor was given a GPU (Ray sets CUDA_VISIBLE_DEVICES): use it even if models.device was left at cpu
            log.info("upscale.diffuse.num_gpus=%s: running the diffusion stage on cuda", cfg.upscale.diffuse.num_gpus)
            self.device = "cuda"
        self.dtype = torch_dtype(cfg.models.dtype)
        self.pipe = load_sr_pipeline(model_path, self.device, self.dtype)
        self.upscaler = TiledUpscaler(self.pipe, cfg.upscale, self.device, self.dtype)

    def upscale_one(self, lr: np.ndarray, caption_high: str, caption_low: str, phrases: list[str],
                    boxes: np.ndarray, source: str, tokens: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
        seed = stable_seed(self.cfg.upscale.seed, source)  # 63 bits: a valid torch seed
        return self.upscaler(lr, caption_high, caption_low, phrases, boxes, seed=seed, image_tokens=tokens)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        lrs = as_list(batch["lr"])
        n = len(lrs)
        status = [str(s) for s in as_list(batch.get("status", ["ok"] * n))]
        errors = [str(e) for e in as_list(batch.get("error", [""] * n))]
        sources = [str(s) for s in as_list(batch.get("source", batch.get("path", [""] * n)))]
        highs, lows = _text(batch, "caption_high", n), _text(batch, "caption_low", n)
        phrases, boxes = _phrases(batch, n), _boxes(batch, n)
        has_tokens = "clip_lr" in batch and "dino_lr" in batch
        clip, dino = (as_list(batch["clip_lr"]), as_list(batch["dino_lr"])) if has_tokens else ([], [])
        outputs, seconds = [], []
        for i, lr in enumerate(lrs):
            if status[i] != "ok":
                outputs.append(EMPTY)
                seconds.append(0.0)
                continue
            t0 = time.perf_counter()
            try:
                tokens = (clip[i], dino[i]) if has_tokens else None
                outputs.append(self.upscale_one(np.asarray(lr, np.uint8), highs[i], lows[i], phrases[i], boxes[i],
                                                sources[i], tokens))
            except Exception as exc:  # one bad image never stops the job: it becomes a reject
                log.exception("diffuse failed on %s", sources[i])
                outputs.append(EMPTY)
                status[i], errors[i] = "error", f"diffuse: {type(exc).__name__}: {exc}"
            seconds.append(time.perf_counter() - t0)
        out = dict(batch)
        out["sr"] = object_array(outputs)
        out["diffuse_s"] = np.asarray(seconds, np.float64)
        out["status"] = np.asarray(status, dtype=object)
        out["error"] = np.asarray(errors, dtype=object)
        return out
