"""Diffusion stage of ``pipeline.upscale``: LR rows -> ``sr`` (the upscaled image), on an actor pool.

Loads a ``SpatialSemanticSRPipeline`` export once per actor, resolved on the actor's own node (an
``s3://`` export fetched into this node's cache, a reference export's base models found or built here,
no model: the tiny profile's untrained build), and upscales each row with tiled latent
diffusion (``spasem.model.tiled_diffusion``). Uses the annotation columns when the stages before it made
them (``caption_high``, ``caption_low``, ``phrases``, ``boxes``, and ``clip_lr``/``dino_lr`` with
``upscale.visual_tokens: image``); without them the tiles are
conditioned on ``upscale.prompt`` and no boxes. A row that fails becomes a reject
(``status`` "error", ``error`` "diffuse: ..."); the other rows of the batch go on.

Out of memory is not the image's fault: the image is retried with half the tiles per model call
(``upscale.tile_batch``) down to one, and if even that does not fit the job stops with
``DiffuseOutOfMemory`` naming the image and the knobs that lower the peak; it never becomes a reject.
Each image logs its progress (VAE tiles, tile-steps) and time left (``stages/progress.py``).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch

from spasem.columns import as_list, object_array, stable_seed
from spasem.config import StorageConfig
from spasem.config.annotate import ModelsConfig
from spasem.config.model import ModelConfig
from spasem.config.upscale import UpscaleConfig
from spasem.encoders import torch_dtype
from spasem.model.export import local_model
from spasem.model.sr_pipeline import load_sr_pipeline
from spasem.model.tiled_diffusion import TiledUpscaler
from stages.progress import ImageProgress, counted, image_work
from stages.rows import RowStatus

log = logging.getLogger(__name__)
EMPTY = np.zeros((0, 0, 3), np.uint8)
# what allocators say when memory runs out: CUDA (torch.OutOfMemoryError), CPU, Apple MPS
_OOM_TEXT = ("out of memory", "can't allocate memory", "failed to allocate memory")


class DiffuseOutOfMemory(RuntimeError):
    """An image that does not fit in memory even at one tile per model call: the job stops, naming it."""


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):  # torch.cuda.OutOfMemoryError is this class
        return True
    return isinstance(exc, RuntimeError) and any(t in str(exc).lower() for t in _OOM_TEXT)


def _free_memory() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


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

    def __init__(self, upscale: UpscaleConfig, models: ModelsConfig, model: str | None,
                 model_cfg: ModelConfig | None = None, storage: StorageConfig | None = None):
        """``model``: the export's URI (local folder or ``s3://``) or None for the tiny untrained build
        (shaped by ``model_cfg``); ``storage`` opens an ``s3://`` export."""
        self.cfg = upscale
        self.device = models.device
        if upscale.diffuse.num_gpus > 0 and self.device == "cpu" and torch.cuda.is_available():
            # the actor was given a GPU (Ray sets CUDA_VISIBLE_DEVICES): use it even if models.device was left at cpu
            log.info("upscale.diffuse.num_gpus=%s: running the diffusion stage on cuda", upscale.diffuse.num_gpus)
            self.device = "cuda"
        self.dtype = torch_dtype(upscale.dtype or models.dtype)
        folder = local_model(model, models, model_cfg or ModelConfig(), storage or StorageConfig())
        self.pipe = load_sr_pipeline(folder, self.device, self.dtype, models)
        self.progress: ImageProgress | None = None
        # count the model calls of the image in progress: tile-steps per UNet call, VAE tiles one by one
        self.pipe.predict_noise = counted(self.pipe.predict_noise, "sample", lambda: self.progress,
                                          lambda latents, *a, **k: int(latents.shape[0]))
        self.upscaler = self._upscaler(upscale.tile_batch)
        if not logging.getLogger().handlers:  # a Ray worker: let the progress lines reach the driver
            logging.basicConfig(level=logging.INFO, format="%(message)s")
        log.setLevel(logging.INFO)

    def _upscaler(self, tile_batch: int) -> TiledUpscaler:
        cfg = self.cfg if tile_batch == self.cfg.tile_batch else self.cfg.model_copy(update={"tile_batch": tile_batch})
        upscaler = TiledUpscaler(self.pipe, cfg, self.device, self.dtype)
        # every encode goes through _posterior (the latent's mean, or the moments of a draw)
        upscaler._posterior = counted(upscaler._posterior, "encode", lambda: self.progress)
        upscaler._decode = counted(upscaler._decode, "decode", lambda: self.progress)
        return upscaler

    def upscale_one(self, lr: np.ndarray, caption_high: str, caption_low: str, phrases: list[str],
                    boxes: np.ndarray, source: str, tokens: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
        """The upscale of one image; out of memory retries with half the tile batch, then raises DiffuseOutOfMemory."""
        seed = stable_seed(self.cfg.seed, source)  # 63 bits: a valid torch seed
        size = f"{lr.shape[1]}x{lr.shape[0]} -> {lr.shape[1] * self.cfg.scale}x{lr.shape[0] * self.cfg.scale}"
        upscaler, batch = self.upscaler, self.cfg.tile_batch
        while True:
            self.progress = ImageProgress(source, size, image_work(lr, self.cfg, upscaler.factor))
            try:
                out = upscaler(lr, caption_high, caption_low, phrases, boxes, seed=seed, image_tokens=tokens)
                self.progress.finish()
                return out
            except Exception as exc:
                if not is_out_of_memory(exc):
                    raise
                _free_memory()
                if batch == 1:
                    raise DiffuseOutOfMemory(
                        f"out of memory upscaling {source} ({size}) even at upscale.tile_batch=1 on {self.device}: "
                        "lower upscale.tile_size and upscale.vae_tile_size, or use a device with more memory "
                        f"({type(exc).__name__}: {' '.join(str(exc).split())[:200]})") from exc
                batch = max(1, batch // 2)
                log.warning("out of memory on %s at tile_batch=%d: retrying with upscale.tile_batch=%d",
                            source, upscaler.cfg.tile_batch, batch)
                upscaler = self._upscaler(batch)
            finally:
                self.progress = None

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
            sr = None
            if rows.ok(i):
                try:
                    sr = self.upscale_one(np.asarray(lr, np.uint8), highs[i], lows[i], phrases[i], boxes[i],
                                          sources[i], tokens)
                except DiffuseOutOfMemory:
                    raise  # no smaller setting is left to try: the job stops, naming the image
                except Exception as exc:  # a failure is data: this image becomes a reject, the batch goes on
                    rows.fail(i, "diffuse", exc, sources[i])
            outputs.append(EMPTY if sr is None else sr)
            seconds.append(time.perf_counter() - t0)
        out = dict(batch)
        out["sr"] = object_array(outputs)
        out["diffuse_s"] = np.asarray(seconds, np.float64)
        out.update(rows.columns())
        return out
