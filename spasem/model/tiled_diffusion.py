"""Tiled latent diffusion: any image size at the memory of one tile.

Per denoising step the model predicts noise on overlapping latent tiles (batched, ``tile_batch`` at a
time); the predictions are blended by ``spasem.model.tiling.TileBlender`` (the VAE's blender) into one
full-latent prediction, and the scheduler steps the whole latent (MultiDiffusion's scheme, so every
diffusers scheduler works unchanged). Each tile is conditioned on its own region: the LR crop under it
(ControlNet input and CLIP/DINOv2 tokens) and the boxes that fall inside it, re-normalized to the tile;
the captions describe the whole image and go to every tile.

The model is any object with the ``SpatialSemanticSRPipeline`` inference interface: ``vae``,
``vae_scale_factor``, ``scheduler``, ``encode_conditioning(...)`` and ``predict_noise(...)``; the
latter applies ``pipe.scheduler.scale_model_input`` itself, so the sampler installs its scheduler there.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from spasem.config.upscale import UpscaleConfig
from spasem.model.color_fix import WAVELET_LEVELS, ChannelStats, adain_fix_uint8, frequency_merge
from spasem.model.latents import decode_latents, scale_latents, unscale_latents
from spasem.model.tiled_vae import BicubicSource, decode_tiled, encode_tiled, xpsr_size
from spasem.model.tiling import Tile, TileBlender, TileGrid
from spasem.model.vae_hook import xpsr_decode, xpsr_encode
from spasem.pixels import HALF_RANGE

UNET_MULTIPLE = 8  # latent sides are padded to this (the UNet downsamples 3 times)
MIN_STRENGTH = 0.2  # the noise level realism 0 starts from (fraction of the schedule)


@dataclass(frozen=True)
class RealismPlan:
    """What ``upscale.realism`` sets: where denoising starts, how many steps run, how hard CFG pushes."""

    strength: float  # fraction of the noise schedule the input latent is noised to
    steps: int  # denoising steps actually run (the tail of the ``steps``-step schedule)
    guidance_scale: float
    conditioning_scale: float
    model_levels: float  # wavelet bands (finest first) taken from the model; the coarser ones from the input


def realism_plan(realism: float, steps: int, guidance_scale: float, conditioning_scale: float) -> RealismPlan:
    """Map realism in [0, 1] to a sampling plan; see docs/upscale.md for why each term moves."""
    if not 0.0 <= realism <= 1.0:
        raise ValueError(f"upscale.realism={realism} must lie in [0, 1]")
    strength = MIN_STRENGTH + (1.0 - MIN_STRENGTH) * realism
    run = max(1, min(steps, round(steps * strength)))
    guidance = 1.0 + (guidance_scale - 1.0) * realism
    # at low realism the LR control pulls harder (up to 1.25x), at full realism it is the configured scale
    control = conditioning_scale * (1.0 + 0.25 * (1.0 - realism))
    levels = 1.0 + WAVELET_LEVELS * realism  # 1: only the finest detail is generated; 6: all of the image
    return RealismPlan(strength, run, guidance, control, levels)


def make_scheduler(name: str, base: Any) -> Any:
    """The diffusers scheduler class ``name`` configured like the model's own scheduler."""
    import diffusers

    cls = getattr(diffusers, name, None)
    if cls is None:
        raise ValueError(f"upscale.scheduler={name!r} is not a diffusers scheduler class")
    return cls.from_config(base.config)


def padded_latent_size(height: int, width: int, factor: int) -> tuple[int, int]:
    """Latent sides covering an output of ``height`` x ``width``, rounded up to the UNet's multiple."""
    grid = factor * UNET_MULTIPLE
    return math.ceil(height / grid) * UNET_MULTIPLE, math.ceil(width / grid) * UNET_MULTIPLE


def latent_size(lr_h: int, lr_w: int, cfg: UpscaleConfig, factor: int) -> tuple[int, int]:
    """The latent the model samples for an ``lr_h`` x ``lr_w`` input: the output padded to the UNet's
    multiple, or under ``size_rule=xpsr`` exactly XPSR's size (multiples of 8 px; diffusers' UNet takes
    any latent size) with no padding, as pipeline_xpsr.py samples it."""
    height, width = lr_h * cfg.scale, lr_w * cfg.scale
    if cfg.size_rule == "xpsr":
        height, width = xpsr_size(height, width, cfg.process_size)
        return math.ceil(height / factor), math.ceil(width / factor)
    return padded_latent_size(height, width, factor)


def lr_window(y: int, x: int, th: int, tw: int, factor: int, scale: float | tuple[float, float], lr_h: int,
              lr_w: int) -> tuple[int, int, int, int]:
    """(top, left, height, width) of the LR crop under a latent tile: a fixed size per tile grid, inside the image.

    ``scale``: model pixels per LR pixel, one for both axes or (y, x) when the model runs at a size that
    is not a whole multiple of the LR (``upscale.size_rule=xpsr``).
    """
    sy, sx = scale if isinstance(scale, tuple) else (scale, scale)
    ch, cw = min(lr_h, math.ceil(th * factor / sy)), min(lr_w, math.ceil(tw * factor / sx))
    top = min(max(0, int((y * factor) // sy)), lr_h - ch)
    left = min(max(0, int((x * factor) // sx)), lr_w - cw)
    return top, left, ch, cw


def regional_boxes(phrases: list[str], boxes: np.ndarray, window: tuple[float, float, float, float],
                   min_visible: float = 0.2) -> tuple[list[str], np.ndarray]:
    """Boxes (normalized xyxy of the image) clipped and re-normalized to ``window``; mostly hidden ones dropped."""
    wx0, wy0, wx1, wy1 = window
    keep_p, keep_b = [], []
    for phrase, box in zip(phrases, np.asarray(boxes, np.float32).reshape(-1, 4), strict=False):
        x0, y0, x1, y1 = (float(v) for v in box)
        cx0, cy0, cx1, cy1 = max(x0, wx0), max(y0, wy0), min(x1, wx1), min(y1, wy1)
        if cx1 <= cx0 or cy1 <= cy0:
            continue
        area = max((x1 - x0) * (y1 - y0), 1e-12)
        tile_area = (wx1 - wx0) * (wy1 - wy0)
        visible = (cx1 - cx0) * (cy1 - cy0)
        if visible / area < min_visible and visible / tile_area < min_visible:
            continue
        sx, sy = wx1 - wx0, wy1 - wy0
        keep_p.append(phrase)
        keep_b.append([(cx0 - wx0) / sx, (cy0 - wy0) / sy, (cx1 - wx0) / sx, (cy1 - wy0) / sy])
    return keep_p, np.asarray(keep_b, np.float32).reshape(-1, 4)


class TiledUpscaler:
    """Upscale one RGB uint8 image with a loaded pipeline, tile by tile.

    ``cfg`` sets the scale, schedule, guidance, tiles and realism. ``SpatialSemanticSRPipeline.__call__``
    runs through this class too (realism 1 by default: all steps from the first timestep, every band
    from the model), so the Python API and the batch CLI share one sampler.
    """

    def __init__(self, pipe: Any, cfg: UpscaleConfig, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32):
        self.pipe, self.cfg = pipe, cfg
        self.device, self.dtype = torch.device(device), dtype
        self.factor = int(pipe.vae_scale_factor)

    def _posterior(self, pixels: torch.Tensor):
        """The VAE's posterior of a tile (under ``vae_rule=xpsr``: of the whole image, through XPSR's hook)."""
        pixels = pixels.to(self.device, self.dtype)
        if self.cfg.vae_rule == "xpsr":
            return xpsr_encode(self.pipe.vae, pixels, self.cfg.vae_encoder_tile)
        return self.pipe.vae.encode(pixels).latent_dist

    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return scale_latents(self.pipe.vae.config, self._posterior(pixels).mean.float())

    def _moments(self, pixels: torch.Tensor) -> torch.Tensor:
        """The VAE posterior's mean and std of a tile, unscaled, stacked on the channels (blended as one)."""
        dist = self._posterior(pixels)
        return torch.cat([dist.mean, dist.std], dim=1).float()

    def lr_latent(self, src: BicubicSource, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
        """The input's latent ``z0``: the posterior's mean, or (``lr_latent: sample``) a draw from it.

        The draw is XPSR's ``latent_dist.sample(generator)`` (diffusers: ``mean + std * randn``), taken from
        the generator before the noise, as pipeline_xpsr.py's ``prepare_latents`` orders them; tiles blend
        their mean and std, and one draw covers the whole latent.
        """
        cfg = self.cfg
        draw = cfg.lr_latent == "sample"
        z = encode_tiled(self._moments if draw else self._encode, src, height, width,
                         *cfg.vae_tiles(height, width), self.factor).to(self.device)
        if not draw:
            return z
        mean, std = z.chunk(2, dim=1)
        eps = torch.randn(mean.shape, generator=generator, device=generator.device).to(self.device)
        return scale_latents(self.pipe.vae.config, mean + std * eps)

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        if self.cfg.vae_rule == "xpsr":
            z = unscale_latents(vae.config, latents.to(self.device)).to(vae.dtype)
            return xpsr_decode(vae, z, self.cfg.vae_decoder_tile)
        return decode_latents(vae, latents.to(self.device))

    def _image_tokens(self, lr: np.ndarray, given: tuple[np.ndarray, np.ndarray] | None) -> dict[str, torch.Tensor]:
        """Whole-image CLIP/DINOv2 tokens: the embeddings stage's columns, else encoded here once."""
        if given is not None:
            return {"clip_tokens": torch.as_tensor(np.asarray(given[0]))[None],
                    "dino_tokens": torch.as_tensor(np.asarray(given[1]))[None]}
        cond = self.pipe.encode_conditioning(lr[None], [""], [""], [[]], [None], self.cfg.negative_prompt, False)
        return {"clip_tokens": cond.clip_tokens, "dino_tokens": cond.dino_tokens}

    def _conditioning(self, lr: np.ndarray, src: BicubicSource, tiles: list[Tile], captions: tuple[str, str],
                      phrases: list[str], boxes: np.ndarray, do_cfg: bool,
                      image_tokens: dict[str, torch.Tensor] | None = None) -> list[Any]:
        """One Conditioning per batch of tiles, each tile with its LR crop and its boxes.

        With ``image_tokens`` every tile gets the whole image's visual tokens instead of its crop's.
        """
        lr_h, lr_w = lr.shape[:2]
        scales = (src.height / lr_h, src.width / lr_w)  # cfg.scale, or less or more under size_rule=xpsr
        out = []
        for chunk in self._batches(tiles):
            crops, tile_phrases, tile_boxes = [], [], []
            for tile in chunk:
                top, left, ch, cw = lr_window(*tile, self.factor, scales, lr_h, lr_w)
                crops.append(lr[top : top + ch, left : left + cw])
                window = (left / lr_w, top / lr_h, (left + cw) / lr_w, (top + ch) / lr_h)
                p, b = regional_boxes(phrases, boxes, window)
                tile_phrases.append(p)
                tile_boxes.append(b)
            n = len(chunk)
            cond = self.pipe.encode_conditioning(
                np.stack(crops), [captions[0]] * n, [captions[1]] * n, tile_phrases, tile_boxes,
                self.cfg.negative_prompt, do_cfg, negative_prompt_low=self.cfg.negative_prompt_low,
            )
            if image_tokens is not None:
                cond = dataclasses.replace(cond, **{
                    name: t.to(getattr(cond, name).device, getattr(cond, name).dtype).expand(n, *t.shape[1:])
                    for name, t in image_tokens.items()})
            out.append(cond)
        return out

    def _batches(self, tiles: list[Tile]) -> list[list[Tile]]:
        step = self.cfg.tile_batch
        return [tiles[i : i + step] for i in range(0, len(tiles), step)]

    def _predictions(self, latents: torch.Tensor, t: torch.Tensor, src: BicubicSource, tiles: list[Tile],
                     conds: list[Any], plan: RealismPlan) -> Iterator[tuple[Tile, torch.Tensor]]:
        """(tile, the model's prediction on it) at step ``t``, in grid order, ``tile_batch`` tiles per call."""
        for chunk, cond in zip(self._batches(tiles), conds, strict=True):
            lat = torch.cat([tile.crop(latents) for tile in chunk])
            ctrl = torch.cat([src.region(*tile.bounds(self.factor)) for tile in chunk])
            eps = self.pipe.predict_noise(lat.to(self.dtype), t, ctrl.to(self.dtype), cond,
                                          plan.guidance_scale, plan.conditioning_scale).float()
            yield from ((tile, eps[k : k + 1]) for k, tile in enumerate(chunk))

    def start_latents(self, scheduler: Any, z0: torch.Tensor, first: torch.Tensor,
                      generator: torch.Generator) -> torch.Tensor:
        """The input's latent ``z0`` noised to the first timestep run, as XPSR's and SeeSR's pipelines start.

        With ``added_noise_level`` a second ``add_noise`` at that timestep follows, as XPSR's pipeline does
        (pipeline_xpsr.py, ``init_latent_with_noise`` False): the two compose to the product of both alphas.
        """
        noise = torch.randn(z0.shape, generator=generator, device=generator.device).to(self.device)
        latents = scheduler.add_noise(z0, noise, first)
        if self.cfg.added_noise_level is not None:
            added = torch.randn(z0.shape, generator=generator, device=generator.device).to(self.device)
            level = torch.full_like(first, self.cfg.added_noise_level)
            latents = scheduler.add_noise(latents, added, level)
        return latents

    def _sample(self, src: BicubicSource, grid: TileGrid, conds: list[Any], plan: RealismPlan,
                generator: torch.Generator) -> torch.Tensor:
        """Latents of the upscale: the input's latents noised to ``plan.strength``, then denoised tile-blended."""
        cfg = self.cfg
        scheduler = make_scheduler(cfg.scheduler, self.pipe.scheduler)
        scheduler.set_timesteps(cfg.steps, device=self.device)
        t_start = cfg.steps - plan.steps
        timesteps = scheduler.timesteps[t_start * scheduler.order :]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(t_start * scheduler.order)
        z0 = self.lr_latent(src, grid.height, grid.width, generator)
        latents = self.start_latents(scheduler, z0, timesteps[:1], generator)
        blender, tiles = TileBlender(grid), grid.tiles
        step_kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
        # predict_noise scales its input with the pipeline's scheduler (Euler's sigma scaling): make it ours
        own, self.pipe.scheduler = self.pipe.scheduler, scheduler
        try:
            for t in timesteps:
                pred = blender.blend(self._predictions(latents, t, src, tiles, conds, plan))
                latents = scheduler.step(pred, t, latents, **step_kwargs).prev_sample
        finally:
            self.pipe.scheduler = own
        return latents

    def _to_image(self, src: BicubicSource, latents: torch.Tensor, plan: RealismPlan) -> np.ndarray:
        """Decode tile by tile, taking the coarse wavelet bands from the input (realism, colour fix)."""
        cfg = self.cfg
        # realism's last term and the wavelet colour fix are one operation: which bands come from the model
        levels = plan.model_levels
        if cfg.color_fix == "wavelet":
            levels = min(levels, float(WAVELET_LEVELS))
        fix = None
        if levels < WAVELET_LEVELS + 1:
            def fix(pixels: torch.Tensor, top: int, left: int) -> torch.Tensor:
                h, w = pixels.shape[-2:]
                return frequency_merge(pixels, src.region(top, top + h, left, left + w), levels)
        out = decode_tiled(self._decode, latents, *cfg.vae_tiles(*latents.shape[2:]), src.height, src.width,
                           self.factor, fix)
        if cfg.color_fix == "adain":
            adain_fix_uint8(out, reference_stats(src), truncate=cfg.adain_rounding == "truncate")
        size = (src.w * src.scale, src.h * src.scale)
        if (src.width, src.height) != size:  # size_rule=xpsr: test.py's image.resize((w * 4, h * 4)), BICUBIC
            out = np.asarray(Image.fromarray(out).resize(size, Image.Resampling.BICUBIC))
        return out

    @torch.no_grad()
    def __call__(self, lr: np.ndarray, caption_high: str = "", caption_low: str = "",
                 phrases: list[str] | None = None, boxes: np.ndarray | None = None, seed: int = 0,
                 image_tokens: tuple[np.ndarray, np.ndarray] | None = None,
                 generator: torch.Generator | None = None) -> np.ndarray:
        """The ``scale``x upscale of ``lr`` (RGB uint8 [h, w, 3]) as RGB uint8 [h*scale, w*scale, 3].

        Noise comes from ``generator``, else from a CPU generator seeded with ``seed``. ``image_tokens``
        (CLIP, DINOv2 LR tokens of the embeddings stage) are used when ``upscale.visual_tokens`` is ``image``.
        Under ``upscale.size_rule=xpsr`` the model runs at XPSR's size and the result is resized to this one.
        """
        cfg = self.cfg
        src = BicubicSource(lr, cfg.scale, self.device, kernel=cfg.upsample,
                            process_size=cfg.process_size if cfg.size_rule == "xpsr" else None)
        grid = TileGrid(*latent_size(*lr.shape[:2], cfg, self.factor), cfg.tile_size, cfg.tile_overlap, cfg.tile_rule)
        plan = realism_plan(cfg.realism, cfg.steps, cfg.guidance_scale, cfg.conditioning_scale)
        tokens = self._image_tokens(lr, image_tokens) if cfg.visual_tokens == "image" else None
        high = caption_high or cfg.prompt
        if cfg.added_prompt:  # XPSR's test.py: caption + " " + added_prompt
            high = f"{high} {cfg.added_prompt}"
        conds = self._conditioning(lr, src, grid.tiles, (high, caption_low or ""), list(phrases or []),
                                   np.zeros((0, 4), np.float32) if boxes is None else boxes,
                                   plan.guidance_scale > 1.0, tokens)
        latents = self._sample(src, grid, conds, plan, generator or torch.Generator().manual_seed(seed))
        return self._to_image(src, latents, plan)


def reference_stats(src: BicubicSource, rows: int = 256) -> ChannelStats:
    """Per-channel statistics of the bicubic upsample (0..255, unrounded), computed in bands (AdaIN's reference)."""
    stats = ChannelStats(3)
    for y in range(0, src.height, rows):
        band = src.region(y, min(y + rows, src.height), 0, src.width)[0].permute(1, 2, 0)
        stats.update(((band + 1.0) * HALF_RANGE).cpu().numpy())
    return stats
