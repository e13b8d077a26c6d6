"""The tile blender: full coverage, exact identity, no seams, output sizes for odd shapes, streaming."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from spasem.model.tiling import TileBlender, TileGrid, ramp, tile_starts


def _blend(fn, x: torch.Tensor, tile: int, overlap: int, scale: int = 1) -> torch.Tensor:
    """``fn`` applied tile by tile to ``x`` and blended, the way the tiled VAE and sampler do it."""
    grid = TileGrid(x.shape[2], x.shape[3], tile, overlap)
    return TileBlender(grid, scale).blend((t, fn(t.crop(x))) for t in grid.tiles)


@pytest.mark.parametrize("size, tile, overlap", [(64, 64, 8), (100, 64, 8), (517, 96, 16), (333, 64, 32)])
def test_tiles_cover_and_overlap(size, tile, overlap):
    starts = tile_starts(size, tile, overlap)
    assert starts[0] == 0 and starts[-1] + min(tile, size) == size
    for a, b in zip(starts, starts[1:], strict=False):
        assert b - a <= tile - overlap, "neighbours overlap by at least `overlap`"


def test_bad_tile_settings_are_errors():
    with pytest.raises(ValueError, match="larger than the overlap"):
        tile_starts(100, 16, 16)
    assert tile_starts(8, 64, 16) == [0], "a side shorter than the overlap is one tile"


def test_ramps_fade_towards_inner_borders_only():
    left = ramp(32, 8, at_start=True, at_end=False)
    right = ramp(32, 8, at_start=False, at_end=True)
    assert left[0] == 1 and right[-1] == 1, "image borders keep full weight"
    assert left[:-2].gt(0).all() and right[2:].gt(0).all()
    assert left[-1] == 0 and right[0] == 0 and (left[-8:].diff() <= 0).all()


def test_identity_is_exact_for_odd_sizes():
    x = torch.rand(2, 3, 333, 517)
    assert torch.allclose(_blend(lambda t: t, x, tile=64, overlap=16), x, atol=1e-6)


def test_scaled_output_size_for_odd_input():
    x = torch.rand(1, 4, 41, 67)
    y = _blend(lambda t: F.interpolate(t, scale_factor=8, mode="nearest"), x, tile=16, overlap=4, scale=8)
    assert y.shape == (1, 4, 41 * 8, 67 * 8)


def test_no_seams_on_a_smooth_gradient():
    h, w = 96, 160
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    x = torch.stack([xx, yy, (xx + yy) / 2])[None]

    def up(t: torch.Tensor) -> torch.Tensor:
        # a per-tile op with a border effect (zero padding), the kind that makes seams without blending
        return F.conv2d(F.interpolate(t, scale_factor=2, mode="bilinear"), torch.full((3, 1, 3, 3), 1 / 9),
                        padding=1, groups=3)

    y = _blend(up, x, tile=48, overlap=16, scale=2)[0]
    jumps_x = (y[:, :, 1:] - y[:, :, :-1]).abs().amax(dim=(0, 1))
    borders = {2 * (s + 48) for s in tile_starts(w, 48, 16)} | {2 * s for s in tile_starts(w, 48, 16)}
    inner = [j for i, j in enumerate(jumps_x.tolist()) if all(abs(i - b) > 4 for b in borders) and 4 < i < 2 * w - 5]
    across = [jumps_x[b - 1].item() for b in borders if 4 < b < 2 * w - 5]
    assert max(across) <= max(inner) * 1.05


def test_streamed_bands_equal_the_whole_blend_and_stay_one_tile_row_high():
    x = torch.rand(1, 3, 70, 90)
    grid = TileGrid(70, 90, 24, 10)
    blender = TileBlender(grid, scale=2)
    bands = list(blender.stream((t, F.interpolate(t.crop(x), scale_factor=2)) for t in grid.tiles))
    tops = [top for top, _ in bands]
    assert tops == [2 * y for y in tile_starts(70, 24, 10)], "one band per tile row, top to bottom"
    assert all(rows.shape[2] <= 2 * 24 and rows.shape[3] == 180 for _, rows in bands)
    whole = blender.blend((t, F.interpolate(t.crop(x), scale_factor=2)) for t in grid.tiles)
    assert torch.equal(torch.cat([rows for _, rows in bands], dim=2), whole) and whole.shape == (1, 3, 140, 180)


def test_tiles_out_of_order_or_missing_are_errors():
    x = torch.rand(1, 1, 40, 40)
    grid = TileGrid(40, 40, 16, 4)
    with pytest.raises(ValueError, match="out of grid order"):
        TileBlender(grid).blend((t, t.crop(x)) for t in reversed(grid.tiles))
    with pytest.raises(ValueError, match="every tile"):
        TileBlender(grid).blend((t, t.crop(x)) for t in grid.tiles[:3])


def _xpsr_reference(h: int, w: int, tile: int, overlap: int) -> tuple[list[tuple[int, int, int]], torch.Tensor]:
    """XPSR's pipeline_xpsr.py tiling loop and ``_gaussian_weights``, transcribed statement by statement:
    the tiles (ofs_y, ofs_x, side) and its stitched average of per-tile values."""
    import math

    if h * w <= tile * tile:
        return [(0, 0, -1)], torch.ones(h, w)
    tile = min(tile, min(h, w))
    var = 0.01
    mid = (tile - 1) / 2
    x_probs = [math.exp(-(x - mid) * (x - mid) / (tile * tile) / (2 * var)) / math.sqrt(2 * math.pi * var)
               for x in range(tile)]
    mid = tile / 2
    y_probs = [math.exp(-(y - mid) * (y - mid) / (tile * tile) / (2 * var)) / math.sqrt(2 * math.pi * var)
               for y in range(tile)]
    weights = torch.outer(torch.tensor(y_probs), torch.tensor(x_probs))
    grid_rows, cur_x = 0, 0
    while cur_x < w:
        cur_x = max(grid_rows * tile - overlap * grid_rows, 0) + tile
        grid_rows += 1
    grid_cols, cur_y = 0, 0
    while cur_y < h:
        cur_y = max(grid_cols * tile - overlap * grid_cols, 0) + tile
        grid_cols += 1
    tiles, ofs_x, ofs_y = [], 0, 0
    for row in range(grid_rows):
        for col in range(grid_cols):
            if col < grid_cols - 1 or row < grid_rows - 1:
                ofs_x = max(row * tile - overlap * row, 0)
                ofs_y = max(col * tile - overlap * col, 0)
            if row == grid_rows - 1:
                ofs_x = w - tile
            if col == grid_cols - 1:
                ofs_y = h - tile
            tiles.append((ofs_y, ofs_x, tile))
    return tiles, weights


@pytest.mark.parametrize("h, w", [(40, 40), (100, 30), (130, 70), (70, 201), (64, 64), (65, 64)])
def test_xpsr_rule_is_xpsrs_layout_and_gaussian_average(h, w):
    """``upscale.tile_rule=xpsr`` (the xpsr preset): the tiles and the weighted average of XPSR's pipeline."""
    tile, overlap = 64, 8
    expected, weights = _xpsr_reference(h, w, tile, overlap)
    grid = TileGrid(h, w, tile, overlap, "xpsr")
    if expected == [(0, 0, -1)]:  # the whole latent at once, no weights
        assert grid.tiles == [grid.tiles[0]] and (grid.tiles[0].h, grid.tiles[0].w) == (h, w)
    else:
        assert sorted((t.y, t.x, t.h) for t in grid.tiles) == sorted(expected)
        assert all(t.h == t.w for t in grid.tiles)
    # per-tile outputs that differ from tile to tile: the blend is XPSR's sum(w * v) / sum(w)
    values = {(t.y, t.x): torch.randn(1, 4, t.h, t.w, generator=torch.Generator().manual_seed(t.y * 1000 + t.x))
              for t in grid.tiles}
    ours = TileBlender(grid).blend((t, values[(t.y, t.x)]) for t in grid.tiles)
    total, count = torch.zeros(1, 4, h, w, dtype=torch.float64), torch.zeros(1, 4, h, w, dtype=torch.float64)
    for t in grid.tiles:
        m = weights if expected != [(0, 0, -1)] else torch.ones(h, w)
        total[..., t.y : t.y + t.h, t.x : t.x + t.w] += values[(t.y, t.x)].double() * m
        count[..., t.y : t.y + t.h, t.x : t.x + t.w] += m
    torch.testing.assert_close(ours.double(), total / count, atol=2e-5, rtol=1e-4)
