"""Tiling with blended overlaps, so memory stays flat as images grow: the one tile blender.

``TileGrid`` covers an image with fixed-size tiles overlapping by at least ``overlap``; ``TileBlender``
sums the per-tile outputs weighted by raised-cosine ramps across the overlaps and divides by the summed
weights, so a function that is smooth on the whole image shows no seam where tiles meet. The VAE
(encode and decode per tile) and latent diffusion (the model predicts per tile) all blend through it.

``rule="xpsr"`` lays the diffusion tiles out and weights them as XPSR's pipeline does
(``pipelines/pipeline_xpsr.py`` L1025-1176 and ``_gaussian_weights``, qyp2000/XPSR @ b5e8411): the
whole latent as one tile while its area is at most ``tile`` squared; else square tiles of
``min(tile, shorter side)`` starting every ``tile - overlap``, the last one moved back to end at the
border, each weighted by the same Gaussian (variance 0.01 of the tile side squared; its centre is
``(side - 1) / 2`` across and ``side / 2`` down, as written there).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch

# floor of the summed weights: every covered pixel has more (XPSR's Gaussian corner weight is ~1e-11
# of its peak, so the floor sits far below it)
EPS = 1e-30
RULES = ("spread", "xpsr")


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of ``tile`` covering ``size``, overlapping by at least ``overlap``.

    A side no longer than one tile is one tile, whatever the overlap.
    """
    if size <= tile:
        return [0]
    if tile <= overlap:
        raise ValueError(f"tile size {tile} must be larger than the overlap {overlap}")
    stride = tile - overlap
    count = -(-(size - tile) // stride) + 1
    # spread the tiles evenly so the last one ends exactly at the border
    return [round(i * (size - tile) / (count - 1)) for i in range(count)]


def xpsr_starts(size: int, tile: int, overlap: int) -> list[int]:
    """XPSR's tile starts along one side: ``i * (tile - overlap)``, the last one at ``size - tile``."""
    count, end = 0, 0
    while end < size:
        end = max(count * tile - overlap * count, 0) + tile
        count += 1
    return [max(i * (tile - overlap), 0) for i in range(count - 1)] + [size - tile]


def xpsr_gaussian(side: int) -> torch.Tensor:
    """XPSR's ``_gaussian_weights(side, side)``: ``[side, side]``, float64 as it computes them."""
    var = 0.01
    axis = torch.arange(side, dtype=torch.float64)

    def probs(midpoint: float) -> torch.Tensor:
        return torch.exp(-(axis - midpoint) ** 2 / (side * side) / (2 * var)) / math.sqrt(2 * math.pi * var)

    return torch.outer(probs(side / 2), probs((side - 1) / 2))  # rows (y) centred at side / 2, as there


def ramp(length: int, overlap: int, at_start: bool, at_end: bool, device=None) -> torch.Tensor:
    """1-D weights: a raised-cosine ramp over ``overlap`` samples on sides that meet another tile.

    The outer quarter of the ramp is zero (a neighbour always covers it with weight) because per-tile models (a VAE's zero padding, a
    UNet's receptive field) are least trustworthy at a tile's own border.
    """
    w = torch.ones(length, device=device)
    n = min(overlap, length)
    if n <= 0:
        return w
    margin = n // 4
    t = torch.arange(1, n - margin + 1, device=device, dtype=torch.float32) / (n - margin + 1)
    steps = torch.cat([torch.zeros(margin, device=device), 0.5 - 0.5 * torch.cos(torch.pi * t)])
    if not at_start:
        w[:n] = torch.minimum(w[:n], steps)
    if not at_end:
        w[-n:] = torch.minimum(w[-n:], steps.flip(0))
    return w


class Tile(NamedTuple):
    """One tile of a grid, in grid units: top, left, height, width."""

    y: int
    x: int
    h: int
    w: int

    def bounds(self, scale: int = 1) -> tuple[int, int, int, int]:
        """(top, bottom, left, right) in units ``scale`` times finer than the grid's."""
        return self.y * scale, (self.y + self.h) * scale, self.x * scale, (self.x + self.w) * scale

    def crop(self, image: torch.Tensor, scale: int = 1) -> torch.Tensor:
        """This tile's region of ``image`` ([..., H, W] at ``scale`` times the grid's resolution)."""
        top, bottom, left, right = self.bounds(scale)
        return image[..., top:bottom, left:right]


@dataclass(frozen=True)
class TileGrid:
    """Tiles of side ``tile`` (clipped to the image) covering ``height`` x ``width``, overlapping by ``overlap``."""

    height: int
    width: int
    tile: int
    overlap: int
    rule: str = "spread"  # or "xpsr": XPSR's layout and Gaussian weights (the module's docstring)

    @property
    def tiles(self) -> list[Tile]:
        """All tiles, row by row (the order ``TileBlender`` takes outputs in)."""
        if self.rule not in RULES:
            raise ValueError(f"unknown tile rule {self.rule!r}; expected one of {', '.join(RULES)}")
        if self.rule == "xpsr":
            if self.height * self.width <= self.tile * self.tile:
                return [Tile(0, 0, self.height, self.width)]
            side = min(self.tile, self.height, self.width)
            xs = xpsr_starts(self.width, side, self.overlap)
            return [Tile(y, x, side, side) for y in xpsr_starts(self.height, side, self.overlap) for x in xs]
        th, tw = min(self.tile, self.height), min(self.tile, self.width)
        xs = tile_starts(self.width, self.tile, self.overlap)
        return [Tile(y, x, th, tw) for y in tile_starts(self.height, self.tile, self.overlap) for x in xs]

    def weights(self, tile: Tile, scale: int = 1) -> torch.Tensor:
        """Blend weights ``[h * scale, w * scale]`` of ``tile``: full weight on image borders, ramps inside
        (``xpsr``: the Gaussian, or ones for the one whole-image tile)."""
        if self.rule == "xpsr":
            if tile.h * tile.w == self.height * self.width:
                return torch.ones(tile.h * scale, tile.w * scale)
            if scale != 1:
                raise ValueError("the xpsr tile rule blends latents only (scale 1)")
            return xpsr_gaussian(tile.h).float()
        o = self.overlap * scale
        wy = ramp(tile.h * scale, o, at_start=tile.y == 0, at_end=tile.y + tile.h >= self.height)
        wx = ramp(tile.w * scale, o, at_start=tile.x == 0, at_end=tile.x + tile.w >= self.width)
        return wy[:, None] * wx[None, :]


class TileBlender:
    """Blends per-tile outputs ``[B, C, h * scale, w * scale]`` of a ``TileGrid`` into one image.

    ``scale`` is output pixels per grid unit (a VAE decoder: 8). Outputs are summed with their weights
    and normalised once per pixel; ``stream`` holds one band (a tile row's height) at a time.
    """

    def __init__(self, grid: TileGrid, scale: int = 1):
        self.grid, self.scale = grid, scale
        self.tiles = grid.tiles
        self._weights: dict[tuple, torch.Tensor] = {}  # at most 9 distinct ones: by the borders a tile touches

    def weights(self, tile: Tile, device: torch.device) -> torch.Tensor:
        g = self.grid
        key = (tile.y == 0, tile.y + tile.h >= g.height, tile.x == 0, tile.x + tile.w >= g.width, device)
        if key not in self._weights:
            self._weights[key] = g.weights(tile, self.scale).to(device)
        return self._weights[key]

    def stream(self, outputs: Iterable[tuple[Tile, torch.Tensor]]) -> Iterator[tuple[int, torch.Tensor]]:
        """``(top, rows)`` of the blended image, float32 ``[B, C, n, width * scale]``, top to bottom.

        ``outputs`` are ``(tile, output)`` in grid order; rows are yielded as soon as no later tile reaches them.
        """
        s, g = self.scale, self.grid
        ys = sorted({t.y for t in self.tiles})
        band = weight = None
        row = 0
        for tile, value in outputs:
            value = value.float()
            if band is None:
                band = value.new_zeros(*value.shape[:2], max(t.h for t in self.tiles) * s, g.width * s)
                weight = value.new_zeros(1, 1, *band.shape[2:])
            if tile.y != ys[row]:
                if row + 1 >= len(ys) or tile.y != ys[row + 1]:
                    raise ValueError(f"tile {tile} is out of grid order: outputs must come row by row")
                done = (tile.y - ys[row]) * s
                yield ys[row] * s, band[:, :, :done] / weight[:, :, :done].clamp_min(EPS)
                # the rows below the finished part carry over into the next tile row's band
                band = torch.cat([band[:, :, done:], band.new_zeros(*band.shape[:2], done, band.shape[3])], dim=2)
                weight = torch.cat([weight[:, :, done:], weight.new_zeros(1, 1, done, weight.shape[3])], dim=2)
                row += 1
            m = self.weights(tile, value.device)
            _, _, left, right = tile.bounds(s)
            band[:, :, :, left:right] += value * m
            weight[:, :, :, left:right] += m
        if band is None or row != len(ys) - 1:
            raise ValueError(f"outputs ended after tile row {row} of {len(ys)}: every tile must be blended")
        yield ys[row] * s, band / weight.clamp_min(EPS)

    def blend(self, outputs: Iterable[tuple[Tile, torch.Tensor]]) -> torch.Tensor:
        """The whole blended image, float32 ``[B, C, height * scale, width * scale]``."""
        return torch.cat([rows for _, rows in self.stream(outputs)], dim=2)
