"""Per-image progress of the diffusion stage: VAE tiles and tile-steps done, time spent, time left.

One image of ``pipeline.upscale`` is three runs of model calls: the VAE encodes the bicubic upsample
tile by tile, the sampler calls the UNet + ControlNet on every diffusion tile at every step (``tile_batch``
tiles per call), and the VAE decodes tile by tile. ``image_work`` counts them before the image starts
(the same grids ``TiledUpscaler`` builds); ``ImageProgress`` counts them as they run and logs one line
at the start, at every ``every`` of the image's estimated time, at least every ``interval_s``, and at
the end. Time left is each phase's remaining units at that phase's measured seconds per unit; the
decoder, until it runs, is counted at ``DECODE_PER_ENCODE`` times the encoder's pace (SD's decoder has
more layers than the encoder and runs them at the higher resolutions); from its first tile on, at its own.

The lines go through ``logging`` in the actor; Ray forwards them to the driver. Ray's log dedup merges
lines that differ only in numbers across actors (``[repeated Nx across cluster]``, latest shown); a
line carries the image's path, so two images are two lines unless their paths differ only in digits.
Set ``RAY_DEDUP_LOGS=0`` on the driver to see every actor's line.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from spasem.config.upscale import UpscaleConfig
from spasem.model.tiled_diffusion import latent_size, realism_plan
from spasem.model.tiling import TileGrid

log = logging.getLogger("stages.diffuse")
PHASES = {"encode": "vae encode tiles", "sample": "tile-steps", "decode": "vae decode tiles"}
DECODE_PER_ENCODE = 2.0  # a first guess of a decoder tile's time, in encoder tiles, until one is measured


def image_work(lr: np.ndarray, cfg: UpscaleConfig, factor: int) -> dict[str, int]:
    """Units of work of one image: VAE tiles each way, and diffusion tiles x steps actually run."""
    lat_h, lat_w = latent_size(lr.shape[0], lr.shape[1], cfg, factor)
    vae = len(TileGrid(lat_h, lat_w, *cfg.vae_tiles(lat_h, lat_w)).tiles)
    tiles = len(TileGrid(lat_h, lat_w, cfg.tile_size, cfg.tile_overlap, cfg.tile_rule).tiles)
    steps = realism_plan(cfg.realism, cfg.steps, cfg.guidance_scale, cfg.conditioning_scale).steps
    return {"encode": vae, "sample": tiles * steps, "decode": vae}


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class ImageProgress:
    """Counts one image's units per phase and logs a progress line with the time left."""

    def __init__(self, name: str, size: str, work: dict[str, int], every: float = 0.1, interval_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic, emit: Callable[[str], None] | None = None):
        self.name, self.size, self.work = name, size, dict(work)
        self.done = dict.fromkeys(work, 0)
        self.spent = dict.fromkeys(work, 0.0)
        self.every, self.interval_s, self.clock = every, interval_s, clock
        self.emit = emit or log.info
        self.start = self.last = clock()
        self.next_mark = every
        self.emit(f"diffuse {name} {size}: started, {self._counts()}")

    def _rate(self, phase: str) -> float | None:
        if self.done[phase]:
            return self.spent[phase] / self.done[phase]
        if phase == "decode" and self.done["encode"]:
            return DECODE_PER_ENCODE * self.spent["encode"] / self.done["encode"]
        return None

    def left_s(self) -> float | None:
        """Seconds left: remaining units at each phase's pace; None until the sampler has run once."""
        total = 0.0
        for phase, units in self.work.items():
            remaining = units - self.done[phase]
            if remaining <= 0:
                continue
            rate = self._rate(phase)
            if rate is None:
                return None
            total += remaining * rate
        return total

    def fraction(self) -> float:
        """Share of the image's estimated time already spent (0 until an estimate exists)."""
        left = self.left_s()
        elapsed = self.clock() - self.start
        if left is None:
            return 0.0
        return 1.0 if elapsed + left <= 0 else elapsed / (elapsed + left)

    def _counts(self) -> str:
        return ", ".join(f"{PHASES[p]} {self.done[p]}/{self.work[p]}" for p in self.work)

    def line(self) -> str:
        elapsed = self.clock() - self.start
        return (f"diffuse {self.name} {self.size}: {self.fraction():.0%} | {self._counts()} | "
                f"{_duration(elapsed)} elapsed, ~{_duration(self.left_s())} left")

    def advance(self, phase: str, units: int, seconds: float) -> None:
        self.done[phase] += units
        self.spent[phase] += seconds
        now = self.clock()
        fraction = self.fraction()
        if fraction >= self.next_mark or now - self.last >= self.interval_s:
            self.emit(self.line())
            self.last = now
            while self.next_mark <= fraction:
                self.next_mark += self.every

    def finish(self) -> None:
        self.emit(f"diffuse {self.name} {self.size}: done in {_duration(self.clock() - self.start)} | {self._counts()}")


def counted(fn: Callable[..., Any], phase: str, current: Callable[[], ImageProgress | None],
            units: Callable[..., int] = lambda *a, **k: 1) -> Callable[..., Any]:
    """``fn`` that reports ``units(*args)`` of ``phase`` to the image in progress after each call."""

    def call(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        progress = current()
        if progress is not None:
            progress.advance(phase, units(*args, **kwargs), time.perf_counter() - t0)
        return out

    return call
