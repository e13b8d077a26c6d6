"""Tiled VAE encode and decode, and the bicubic upsample computed region by region.

Nothing here ever holds a float copy of the full-resolution image: the bicubic upsample of the input
is computed per tile from the small LR crop that feeds it (exactly equal to the global upsample),
the encoder blends latent tiles into the (48x smaller) latent, and the decoder streams bands of
tile rows into the uint8 output, so peak memory is one tile's activations plus one band.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from spasem.model.tiling import Tile, TileBlender, TileGrid
from spasem.pixels import signed_to_hwc, to_signed

# (tile pixels [1, 3, h, w] in [-1, 1], top, left) -> corrected tile
TileFix = Callable[[torch.Tensor, int, int], torch.Tensor]


UPSAMPLES = ("torch", "pillow")


def _short_side_up(height: int, width: int, process_size: int) -> tuple[int, int]:
    """torchvision's ``Resize(process_size)`` size, applied as XPSR's test.py does: only to a smaller short side.

    The short side becomes ``process_size`` and the long side ``int(process_size * long / short)``.
    """
    if min(height, width) >= process_size:
        return height, width
    short, long = sorted((height, width))
    new_long = int(process_size * long / short)
    return (process_size, new_long) if height <= width else (new_long, process_size)


def xpsr_size(height: int, width: int, process_size: int) -> tuple[int, int]:
    """The size XPSR's test.py runs its pipeline at, given the x``scale`` upsample's ``height`` x ``width``:
    a short side under ``process_size`` up to it, then both sides down to multiples of 8."""
    height, width = _short_side_up(height, width, process_size)
    return height // 8 * 8, width // 8 * 8


def xpsr_resize(big: Image.Image, process_size: int) -> Image.Image:
    """XPSR test.py's resizes of the Pillow upsample: bilinear up to ``process_size``, bicubic to multiples of 8.

    A step that keeps the size is a copy, as ``Image.resize`` to an image's own size is in Pillow.
    """
    h, w = _short_side_up(big.size[1], big.size[0], process_size)
    if (w, h) != big.size:  # transforms.Resize(process_size, BILINEAR) on a PIL image
        big = big.resize((w, h), Image.Resampling.BILINEAR)
    return big.resize((w // 8 * 8, h // 8 * 8), Image.Resampling.BICUBIC)


class BicubicSource:
    """The bicubic x``scale`` upsample of an RGB uint8 LR image, in [-1, 1], region by region.

    Regions may reach past the image into the padding up to a multiple of the tile grid; the padding
    replicates the last row and column.

    ``kernel`` ``torch``: ``F.interpolate(mode="bicubic")`` (a = -0.75, unrounded floats, as training
    upsamples the LR), computed per region. ``pillow``: Pillow's ``Image.resize`` default, BICUBIC
    (a = -0.5) rounded to uint8, which XPSR's test.py feeds its pipeline; made once for the whole
    image and kept as uint8 (3 bytes per output pixel).

    ``process_size`` (``pillow`` only): the Pillow upsample is then resized as XPSR's test.py resizes
    it (``xpsr_resize``), and ``height`` x ``width`` is that size, the one the model runs at.
    """

    def __init__(self, lr: np.ndarray, scale: int, device: torch.device | str = "cpu", kernel: str = "torch",
                 process_size: int | None = None):
        if kernel not in UPSAMPLES:
            raise ValueError(f"unknown upsample {kernel!r}; expected one of {', '.join(UPSAMPLES)}")
        if process_size is not None and kernel != "pillow":
            raise ValueError("process_size resizes the Pillow upsample: it needs kernel='pillow'")
        lr = np.array(lr, dtype=np.uint8)  # a writable copy
        self.scale = scale
        self.h, self.w = lr.shape[:2]
        self.height, self.width = self.h * scale, self.w * scale
        self.lr = to_signed(torch.from_numpy(lr).to(device).permute(2, 0, 1)[None])
        self.upsampled = None
        if kernel == "pillow":
            big = Image.fromarray(lr).resize((self.width, self.height), Image.Resampling.BICUBIC)
            if process_size is not None:
                big = xpsr_resize(big, process_size)
                self.width, self.height = big.size
            self.upsampled = torch.from_numpy(np.array(big)).to(device)  # [H, W, 3] uint8

    def _axis(self, a: int, b: int, size: int) -> tuple[int, int]:
        """LR range [la, lb) whose upsample covers output [a, b) exactly (bicubic reads 2 taps each side)."""
        return max(0, a // self.scale - 2), min(size, (b - 1) // self.scale + 3)

    def region(self, y0: int, y1: int, x0: int, x1: int) -> torch.Tensor:
        """Output pixels [y0, y1) x [x0, x1) as [1, 3, y1 - y0, x1 - x0], float32 in [-1, 1]."""
        vy1, vx1 = min(y1, self.height), min(x1, self.width)
        if y0 >= vy1 or x0 >= vx1:
            raise ValueError(f"region ({y0}, {x0}) lies outside the {self.height}x{self.width} image")
        if self.upsampled is not None:
            out = to_signed(self.upsampled[y0:vy1, x0:vx1].permute(2, 0, 1)[None])
            pad_b, pad_r = y1 - vy1, x1 - vx1
            return F.pad(out, (0, pad_r, 0, pad_b), mode="replicate") if pad_b or pad_r else out
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


def bicubic_upsample(lr: np.ndarray, scale: int, kernel: str = "torch") -> np.ndarray:
    """The reference bicubic upsample as RGB uint8 (what ``realism`` 0 stays close to)."""
    return signed_to_hwc(BicubicSource(lr, scale, kernel=kernel).full())[0]


@torch.no_grad()
def encode_tiled(
    encode: Callable[[torch.Tensor], torch.Tensor], source: BicubicSource, lat_h: int, lat_w: int,
    tile: int, overlap: int, factor: int = 8,
) -> torch.Tensor:
    """Latents [1, C, lat_h, lat_w] of the padded upsample, one tile at a time; ``encode`` maps pixels to latents."""
    grid = TileGrid(lat_h, lat_w, tile, overlap)
    return TileBlender(grid).blend((t, encode(source.region(*t.bounds(factor)))) for t in grid.tiles)


@torch.no_grad()
def decode_tiled(
    decode: Callable[[torch.Tensor], torch.Tensor], latents: torch.Tensor, tile: int, overlap: int,
    out_h: int, out_w: int, factor: int = 8, fix: TileFix | None = None,
) -> np.ndarray:
    """RGB uint8 [out_h, out_w, 3] from latents [1, C, h, w], streamed in bands of tile rows.

    ``decode`` maps a latent tile to pixels in [-1, 1]; ``fix`` (colour correction) runs per tile
    before blending. Only one band (a tile row's height, the full width) is ever held in float.
    """
    grid = TileGrid(latents.shape[2], latents.shape[3], tile, overlap)

    def tiles() -> Iterator[tuple[Tile, torch.Tensor]]:
        for t in grid.tiles:
            pixels = decode(t.crop(latents)).float()
            if fix is not None:
                pixels = fix(pixels, t.y * factor, t.x * factor)
            yield t, pixels.cpu()

    out = np.empty((out_h, out_w, 3), np.uint8)
    for top, rows in TileBlender(grid, factor).stream(tiles()):
        keep = min(rows.shape[2], out_h - top)  # the latent grid may reach past the output (padding)
        if keep > 0:
            out[top : top + keep] = signed_to_hwc(rows[:, :, :keep, :out_w])[0]
    return out
