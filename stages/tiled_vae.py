"""Tiled VAE encode and decode, and the bicubic upsample computed region by region.

Nothing here ever holds a float copy of the full-resolution image: the bicubic upsample of the input
is computed per tile from the small LR crop that feeds it (exactly equal to the global upsample),
the encoder blends latent tiles into the (48x smaller) latent, and the decoder streams bands of
tile rows into the uint8 output, so peak memory is one tile's activations plus one band.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from stages.tiling import ramp, tile_starts

# (tile pixels [1, 3, h, w] in [-1, 1], top, left) -> corrected tile
TileFix = Callable[[torch.Tensor, int, int], torch.Tensor]


class BicubicSource:
    """The bicubic x``scale`` upsample of an RGB uint8 LR image, in [-1, 1], region by region.

    Regions may reach past the image into the padding up to a multiple of the tile grid; the padding
    replicates the last row and column.
    """

    def __init__(self, lr: np.ndarray, scale: int, device: torch.device | str = "cpu"):
        lr_t = torch.from_numpy(np.array(lr, dtype=np.uint8)).to(device)  # a writable copy
        self.lr = lr_t.permute(2, 0, 1)[None].float() / 127.5 - 1.0
        self.scale = scale
        self.h, self.w = lr.shape[:2]
        self.height, self.width = self.h * scale, self.w * scale

    def _axis(self, a: int, b: int, size: int) -> tuple[int, int]:
        """LR range [la, lb) whose upsample covers output [a, b) exactly (bicubic reads 2 taps each side)."""
        return max(0, a // self.scale - 2), min(size, (b - 1) // self.scale + 3)

    def region(self, y0: int, y1: int, x0: int, x1: int) -> torch.Tensor:
        """Output pixels [y0, y1) x [x0, x1) as [1, 3, y1 - y0, x1 - x0], float32 in [-1, 1]."""
        vy1, vx1 = min(y1, self.height), min(x1, self.width)
        if y0 >= vy1 or x0 >= vx1:
            raise ValueError(f"region ({y0}, {x0}) lies outside the {self.height}x{self.width} image")
        ly0, ly1 = self._axis(y0, vy1, self.h)
        lx0, lx1 = self._axis(x0, vx1, self.w)
        crop = self.lr[:, :, ly0:ly1, lx0:lx1]
        up = F.interpolate(crop, scale_factor=self.scale, mode="bicubic", align_corners=False)
        oy, ox = y0 - ly0 * self.scale, x0 - lx0 * self.scale
        out = up[:, :, oy : oy + vy1 - y0, ox : ox + vx1 - x0].clamp(-1.0, 1.0)
        pad_b, pad_r = y1 - vy1, x1 - vx1
        if pad_b or pad_r:
            out = F.pad(out, (0, pad_r, 0, pad_b), mode="replicate")
        return out

    def full(self) -> torch.Tensor:
        """The whole upsample (tests and small images only: it is the full-resolution float image)."""
        return self.region(0, self.height, 0, self.width)


def bicubic_upsample(lr: np.ndarray, scale: int) -> np.ndarray:
    """The reference bicubic upsample as RGB uint8 (what ``realism`` 0 stays close to)."""
    up = BicubicSource(lr, scale).full()[0].permute(1, 2, 0)
    return ((up + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()


def _mask(th: int, tw: int, overlap: int, y_edges: tuple[bool, bool], x_edges: tuple[bool, bool]) -> torch.Tensor:
    wy = ramp(th, overlap, at_start=y_edges[0], at_end=y_edges[1])
    wx = ramp(tw, overlap, at_start=x_edges[0], at_end=x_edges[1])
    return wy[:, None] * wx[None, :]


def starts(size: int, tile: int, overlap: int) -> list[int]:
    """Tile offsets along one side; a side no longer than a tile is one tile, whatever the overlap."""
    return [0] if size <= tile else tile_starts(size, tile, overlap)


def latent_tiles(lat_h: int, lat_w: int, tile: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """(y, x, th, tw) of the overlapping latent tiles covering ``lat_h`` x ``lat_w``, row by row."""
    th, tw = min(tile, lat_h), min(tile, lat_w)
    return [(y, x, th, tw) for y in starts(lat_h, tile, overlap) for x in starts(lat_w, tile, overlap)]


def tile_mask(y: int, x: int, th: int, tw: int, lat_h: int, lat_w: int, overlap: int, factor: int = 1) -> torch.Tensor:
    """Blend weights [th*factor, tw*factor] of one tile: full weight on image borders, ramps inside."""
    return _mask(th * factor, tw * factor, overlap * factor, (y == 0, y + th >= lat_h), (x == 0, x + tw >= lat_w))


@torch.no_grad()
def encode_tiled(
    encode: Callable[[torch.Tensor], torch.Tensor], source: BicubicSource, lat_h: int, lat_w: int,
    tile: int, overlap: int, factor: int = 8,
) -> torch.Tensor:
    """Latents [1, C, lat_h, lat_w] of the padded upsample, one tile at a time; ``encode`` maps pixels to latents."""
    out = weight = None
    for y, x, th, tw in latent_tiles(lat_h, lat_w, tile, overlap):
        z = encode(source.region(y * factor, (y + th) * factor, x * factor, (x + tw) * factor)).float()
        if out is None:
            out = torch.zeros(1, z.shape[1], lat_h, lat_w, device=z.device)
            weight = torch.zeros(1, 1, lat_h, lat_w, device=z.device)
        m = tile_mask(y, x, th, tw, lat_h, lat_w, overlap).to(z.device)
        out[:, :, y : y + th, x : x + tw] += z * m
        weight[:, :, y : y + th, x : x + tw] += m
    return out / weight.clamp_min(1e-8)


@torch.no_grad()
def decode_tiled(
    decode: Callable[[torch.Tensor], torch.Tensor], latents: torch.Tensor, tile: int, overlap: int,
    out_h: int, out_w: int, factor: int = 8, fix: TileFix | None = None,
) -> np.ndarray:
    """RGB uint8 [out_h, out_w, 3] from latents [1, C, h, w], streamed in bands of tile rows.

    ``decode`` maps a latent tile to pixels in [-1, 1]; ``fix`` (colour correction) runs per tile
    before blending. Only one band (a tile row's height, the full width) is ever held in float.
    """
    _, _, lat_h, lat_w = latents.shape
    th, tw = min(tile, lat_h), min(tile, lat_w)
    ys, xs = starts(lat_h, tile, overlap), starts(lat_w, tile, overlap)
    out = np.empty((out_h, out_w, 3), np.uint8)
    band_h, width = th * factor, lat_w * factor
    band = torch.zeros(3, band_h, width)
    weight = torch.zeros(1, band_h, width)
    for i, y in enumerate(ys):
        for x in xs:
            pixels = decode(latents[:, :, y : y + th, x : x + tw]).float()
            if fix is not None:
                pixels = fix(pixels, y * factor, x * factor)
            pixels = pixels.cpu()
            m = tile_mask(y, x, th, tw, lat_h, lat_w, overlap, factor)
            band[:, :, x * factor : (x + tw) * factor] += pixels[0] * m
            weight[:, :, x * factor : (x + tw) * factor] += m
        top = y * factor
        done = (ys[i + 1] - y) * factor if i + 1 < len(ys) else band_h
        rows = (band[:, :done] / weight[:, :done].clamp_min(1e-8)).permute(1, 2, 0)
        keep = min(done, out_h - top)
        if keep > 0:
            pixels8 = ((rows[:keep, :out_w] + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
            out[top : top + keep] = pixels8.numpy()
        # the rows below this tile row's finished part carry over into the next band
        band = torch.cat([band[:, done:], torch.zeros(3, done, width)], dim=1)
        weight = torch.cat([weight[:, done:], torch.zeros(1, done, width)], dim=1)
    return out
