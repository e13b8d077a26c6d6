"""Tiling with blended overlaps, so memory stays flat as images grow.

``tile_starts`` covers a side with fixed-size tiles overlapping by at least ``overlap``; the blend
weights ramp smoothly across the overlap and are normalized by their sum, so a function
that is smooth on the whole image shows no seam where tiles meet. Used for the VAE (encode and
decode per tile) and for latent diffusion (the model predicts per tile; predictions are blended).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of ``tile`` covering ``size``, overlapping by at least ``overlap``."""
    if tile <= overlap:
        raise ValueError(f"tile size {tile} must be larger than the overlap {overlap}")
    if size <= tile:
        return [0]
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


def tiled_map(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    tile: int,
    overlap: int,
    out_scale: float = 1.0,
    out_channels: int | None = None,
) -> torch.Tensor:
    """Apply ``fn`` to overlapping tiles of ``x`` ([B, C, H, W]) and blend the outputs.

    ``fn`` maps a ``[B, C, t, t]`` tile to ``[B, C', t * out_scale, t * out_scale]`` (the VAE decoder:
    8, the encoder: 1/8, a diffusion step: 1). Peak memory is one tile's worth of ``fn``.
    """
    b, _, h, w = x.shape
    th, tw = min(tile, h), min(tile, w)
    ys, xs = tile_starts(h, th, overlap), tile_starts(w, tw, overlap)
    out_h, out_w = round(h * out_scale), round(w * out_scale)
    out = None
    weight = torch.zeros(1, 1, out_h, out_w, device=x.device, dtype=torch.float32)
    o = round(overlap * out_scale)
    for y in ys:
        for x0 in xs:
            y_out = fn(x[:, :, y : y + th, x0 : x0 + tw]).float()
            if out is None:
                out = torch.zeros(b, out_channels or y_out.shape[1], out_h, out_w, device=x.device)
            oy, ox = round(y * out_scale), round(x0 * out_scale)
            ph, pw = y_out.shape[-2:]
            wy = ramp(ph, o, at_start=y == 0, at_end=y + th >= h, device=x.device)
            wx = ramp(pw, o, at_start=x0 == 0, at_end=x0 + tw >= w, device=x.device)
            mask = (wy[:, None] * wx[None, :])[None, None]
            out[:, :, oy : oy + ph, ox : ox + pw] += y_out * mask
            weight[:, :, oy : oy + ph, ox : ox + pw] += mask
    return (out / weight.clamp_min(1e-8)).to(x.dtype)
