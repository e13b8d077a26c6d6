"""Tiling with blended overlaps, so memory stays flat as images grow: the one tile blender.

``TileGrid`` covers an image with fixed-size tiles overlapping by at least ``overlap``; ``TileBlender``
sums the per-tile outputs weighted by raised-cosine ramps across the overlaps and divides by the summed
weights, so a function that is smooth on the whole image shows no seam where tiles meet. The VAE
(encode and decode per tile) and latent diffusion (the model predicts per tile) all blend through it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch

EPS = 1e-8  # floor of the summed weights (every covered pixel has far more)


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

    @property
    def tiles(self) -> list[Tile]:
        """All tiles, row by row (the order ``TileBlender`` takes outputs in)."""
        th, tw = min(self.tile, self.height), min(self.tile, self.width)
        xs = tile_starts(self.width, self.tile, self.overlap)
        return [Tile(y, x, th, tw) for y in tile_starts(self.height, self.tile, self.overlap) for x in xs]

    def weights(self, tile: Tile, scale: int = 1) -> torch.Tensor:
        """Blend weights ``[h * scale, w * scale]`` of ``tile``: full weight on image borders, ramps inside."""
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
                band = value.new_zeros(*value.shape[:2], min(g.tile, g.height) * s, g.width * s)
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
