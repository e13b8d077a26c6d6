"""XPSR's tiled VAE hook (``spasem.model.vae_hook``) on the tiny profile's real diffusers VAE."""

from __future__ import annotations

import copy
import math

import cv2
import numpy as np
import pytest
import torch

from spasem.model import vae_hook
from spasem.model.vae_hook import (
    ENCODER_PAD,
    run_tiles,
    split_tiles,
    tiled_forward,
    xpsr_decode,
    xpsr_encode,
)
from tests.conftest import skimage_photo


def _hook_split_tiles(h, w, tile_size, pad, is_decoder):
    """myutils/vaehook.py ``VAEHook.split_tiles`` and ``get_best_tile_size``, statement by statement."""
    def get_best_tile_size(lowerbound, upperbound):
        divider = 32
        while divider >= 2:
            remainer = lowerbound % divider
            if remainer == 0:
                return lowerbound
            candidate = lowerbound - remainer + divider
            if candidate <= upperbound:
                return candidate
            divider //= 2
        return lowerbound

    tile_input_bboxes, tile_output_bboxes = [], []
    num_height_tiles = math.ceil((h - 2 * pad) / tile_size)
    num_width_tiles = math.ceil((w - 2 * pad) / tile_size)
    num_height_tiles = max(num_height_tiles, 1)
    num_width_tiles = max(num_width_tiles, 1)
    real_tile_height = math.ceil((h - 2 * pad) / num_height_tiles)
    real_tile_width = math.ceil((w - 2 * pad) / num_width_tiles)
    real_tile_height = get_best_tile_size(real_tile_height, tile_size)
    real_tile_width = get_best_tile_size(real_tile_width, tile_size)
    for i in range(num_height_tiles):
        for j in range(num_width_tiles):
            input_bbox = [
                pad + j * real_tile_width,
                min(pad + (j + 1) * real_tile_width, w),
                pad + i * real_tile_height,
                min(pad + (i + 1) * real_tile_height, h),
            ]
            output_bbox = [
                input_bbox[0] if input_bbox[0] > pad else 0,
                input_bbox[1] if input_bbox[1] < w - pad else w,
                input_bbox[2] if input_bbox[2] > pad else 0,
                input_bbox[3] if input_bbox[3] < h - pad else h,
            ]
            output_bbox = [x * 8 if is_decoder else x // 8 for x in output_bbox]
            tile_output_bboxes.append(output_bbox)
            tile_input_bboxes.append([
                max(0, input_bbox[0] - pad),
                min(w, input_bbox[1] + pad),
                max(0, input_bbox[2] - pad),
                min(h, input_bbox[3] + pad),
            ])
    return tile_input_bboxes, tile_output_bboxes


@pytest.mark.parametrize("h, w, tile, pad, dec", [
    (2048, 1536, 1024, 32, False), (1100, 3000, 1024, 32, False), (1089, 1089, 1024, 32, False),
    (4000, 248, 1024, 32, False), (250, 187, 224, 11, True), (700, 455, 224, 11, True), (96, 40, 32, 11, True),
])
def test_tiles_are_the_hooks(h, w, tile, pad, dec):
    assert split_tiles(h, w, tile, pad, dec) == _hook_split_tiles(h, w, tile, pad, dec)


def test_tiles_cover_the_output_once():
    boxes, targets = split_tiles(1600, 2400, 1024, ENCODER_PAD, False)
    cover = np.zeros((200, 300), int)
    for b in targets:
        cover[b[2] : b[3], b[0] : b[1]] += 1
    assert (cover == 1).all() and len(boxes) == 6


@pytest.fixture(scope="module")
def vae(tiny):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(tiny["sd"], subfolder="vae").eval()


def _photo(w: int, h: int) -> torch.Tensor:
    img = cv2.resize(skimage_photo("astronaut.png")[..., :3], (w, h), interpolation=cv2.INTER_AREA)
    return torch.from_numpy(img).permute(2, 0, 1)[None].float() / 127.5 - 1


@pytest.fixture(scope="module")
def photo() -> torch.Tensor:
    return _photo(192, 128)


@pytest.fixture(scope="module")
def latent(vae) -> torch.Tensor:
    """A 48 x 64 latent (of a 384 x 512 photo), after post_quant_conv: what the decoder takes."""
    with torch.no_grad():
        return vae.post_quant_conv(vae.encode(_photo(512, 384)).latent_dist.mean)


def test_small_inputs_run_the_vae_unchanged(vae, photo):
    """The hook runs the network's own forward up to tile + 2 * pad: encode and decode are diffusers' own."""
    with torch.no_grad():
        dist = vae.encode(photo).latent_dist
        assert torch.equal(xpsr_encode(vae, photo, 128).mean, dist.mean)
        z = dist.mean  # 16 x 24 latent px: whole up to a 24 px tile (24 + 2 * 11 >= 24)
        assert torch.equal(xpsr_decode(vae, z, 24), vae.decode(z).sample)


def _single_norm_attention(monkeypatch):
    """The hook's attention without its second group norm (the plain network normalizes once)."""
    real = vae_hook._attention

    def once(attn, x):
        norm, attn.group_norm = attn.group_norm, None
        try:
            return real(attn, x)
        finally:
            attn.group_norm = norm

    monkeypatch.setattr(vae_hook, "_attention", once)


@pytest.mark.parametrize("is_decoder", [False, True])
def test_one_tile_task_queue_is_the_network(vae, photo, latent, monkeypatch, is_decoder):
    """The task queue built from the diffusers modules runs the encoder / decoder exactly, but for the
    hook's second group norm in the mid block's attention, which changes the output once the norm's
    affine is not the identity (as in any trained VAE; a fresh one's is)."""
    net = copy.deepcopy(vae.decoder if is_decoder else vae.encoder)
    norm = net.mid_block.attentions[0].group_norm
    with torch.no_grad():
        norm.weight.copy_(1 + 0.5 * torch.randn(norm.weight.shape, generator=torch.Generator().manual_seed(0)))
        norm.bias.copy_(0.3 * torch.randn(norm.bias.shape, generator=torch.Generator().manual_seed(1)))
        x = latent if is_decoder else photo
        h, w = x.shape[2:]
        one = [[0, w, 0, h]], [[0, w * 8, 0, h * 8] if is_decoder else [0, w // 8, 0, h // 8]]
        quirk = run_tiles(net, x, *one, is_decoder)
        expected = net(x)
        _single_norm_attention(monkeypatch)
        plain = run_tiles(net, x, *one, is_decoder)
    torch.testing.assert_close(plain, expected, atol=1e-4, rtol=1e-4)  # batch_norm vs group_norm rounding
    assert (quirk - expected).abs().max() > 1e-3


@pytest.mark.parametrize("is_decoder", [False, True])
def test_tiles_share_group_norm_statistics(vae, photo, latent, monkeypatch, is_decoder):
    """Tiled with shared statistics lands near the one-tile run; the same tiles normalized each on its own
    statistics land far from it. Every tile's attention sees only its tile."""
    net = vae.decoder if is_decoder else vae.encoder
    with torch.no_grad():
        x = latent if is_decoder else photo
        h, w = x.shape[2:]
        tile, pad = (12, 11) if is_decoder else (48, ENCODER_PAD)
        boxes, targets = split_tiles(h, w, tile, pad, is_decoder)
        assert len(boxes) >= 4
        one = run_tiles(net, x, [[0, w, 0, h]], [[0, w * 8, 0, h * 8] if is_decoder else [0, w // 8, 0, h // 8]],
                        is_decoder)
        seen = []
        real = vae_hook._attention
        monkeypatch.setattr(vae_hook, "_attention", lambda attn, t: (seen.append(t.shape[-2:]), real(attn, t))[1])
        shared = tiled_forward(net, x, tile, is_decoder)
        monkeypatch.setattr(vae_hook, "_attention", real)
        assert len(seen) == len(boxes) and all(s[0] < one.shape[2] for s in seen)
        # each tile on its own statistics: what the sharing avoids
        alone = torch.zeros_like(one)
        for b, t in zip(boxes, targets, strict=True):
            out = run_tiles(net, x[:, :, b[2] : b[3], b[0] : b[1]], [[0, b[1] - b[0], 0, b[3] - b[2]]],
                            [[0, (b[1] - b[0]) * 8, 0, (b[3] - b[2]) * 8] if is_decoder
                             else [0, (b[1] - b[0]) // 8, 0, (b[3] - b[2]) // 8]], is_decoder)
            alone[:, :, t[2] : t[3], t[0] : t[1]] = vae_hook.crop_valid_region(out, b, t, is_decoder)
    err_shared = (shared - one).abs().mean().item()
    err_alone = (alone - one).abs().mean().item()
    # measured: encoder 0.040 against 0.115 (6 tiles), decoder 0.045 against 0.082 (12 tiles)
    assert shared.shape == one.shape and err_shared < 0.6 * err_alone, (err_shared, err_alone)


def test_xpsr_encode_and_decode_tile_large_inputs(vae, photo, latent, monkeypatch):
    calls = []
    real = vae_hook.run_tiles
    monkeypatch.setattr(vae_hook, "run_tiles", lambda *a: (calls.append(len(a[2])), real(*a))[1])
    with torch.no_grad():
        dist = xpsr_encode(vae, photo, 48)
        assert dist.mean.shape == (1, 4, 16, 24) and calls == [len(split_tiles(128, 192, 48, 32, False)[0])]
        out = xpsr_decode(vae, vae.encode(_photo(512, 384)).latent_dist.mean, 12)
    assert out.shape == (1, 3, 384, 512) and calls[1:] == [len(split_tiles(48, 64, 12, 11, True)[0])]
