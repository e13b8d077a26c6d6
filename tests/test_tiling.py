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
