"""XPSR's tiled VAE: the encoder and decoder run tile by tile with GroupNorm statistics shared by all tiles.

Source: qyp2000/XPSR ``myutils/vaehook.py`` (``VAEHook``, from multidiffusion-upscaler's Tiled VAE), as
``test.py`` installs it: ``_init_tiled_vae(encoder_tile_size=1024, decoder_tile_size=224)`` with the fast
modes and the colour fix off. Written from that file's behaviour, step by step:

- an input whose larger side is at most ``tile + 2 * pad`` runs whole (``pad`` 32 image px for the
  encoder, 11 latent px for the decoder); a larger one is cut by ``split_tiles``;
- each tile runs the network as a queue of tasks (``build_tasks``). At every GroupNorm all tiles stop;
  each tile's per-group variance and mean (over its whole padded area) are averaged with weights
  proportional to the tiles' pixel counts, and every tile is normalized with those (``F.batch_norm``
  with fixed statistics, eps 1e-6, then the norm's affine);
- the tiles run in alternating order (forward, then backward), so the one on the device stays there;
  the others and the stored residuals wait in CPU memory, as in the hook;
- each finished tile's valid region is cropped (``crop_valid_region``) and placed, no blending.

Two things of the hook are kept though they look unintended: the mid block's attention normalizes
twice (the shared-statistics GroupNorm task, then the attention's own ``group_norm`` per tile inside
its forward), and attention runs within each tile. Where the hook hard-codes Stable Diffusion's VAE
(32 groups, 2 and 3 resnets per block), this reads the numbers from the modules, which is the same
for SD's VAE and lets the project's tiny VAE run it.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

ENCODER_PAD, DECODER_PAD = 32, 11


def best_tile_size(lower: int, upper: int) -> int:
    """The hook's ``get_best_tile_size``: round ``lower`` up to a multiple of 32 (else 16, 8, 4, 2) within ``upper``."""
    divider = 32
    while divider >= 2:
        remainder = lower % divider
        if remainder == 0:
            return lower
        candidate = lower - remainder + divider
        if candidate <= upper:
            return candidate
        divider //= 2
    return lower


def split_tiles(h: int, w: int, tile: int, pad: int, is_decoder: bool
                ) -> tuple[list[list[int]], list[list[int]]]:
    """Input boxes (padded) and output boxes of the tiles, ``[x0, x1, y0, y1]`` each, as the hook's ``split_tiles``."""
    rows = max(math.ceil((h - 2 * pad) / tile), 1)
    cols = max(math.ceil((w - 2 * pad) / tile), 1)
    tile_h = best_tile_size(math.ceil((h - 2 * pad) / rows), tile)
    tile_w = best_tile_size(math.ceil((w - 2 * pad) / cols), tile)
    inputs, outputs = [], []
    for i in range(rows):
        for j in range(cols):
            box = [pad + j * tile_w, min(pad + (j + 1) * tile_w, w), pad + i * tile_h, min(pad + (i + 1) * tile_h, h)]
            out = [box[0] if box[0] > pad else 0, box[1] if box[1] < w - pad else w,
                   box[2] if box[2] > pad else 0, box[3] if box[3] < h - pad else h]
            outputs.append([v * 8 if is_decoder else v // 8 for v in out])
            inputs.append([max(0, box[0] - pad), min(w, box[1] + pad), max(0, box[2] - pad), min(h, box[3] + pad)])
    return inputs, outputs


def _silu(x: torch.Tensor) -> torch.Tensor:
    return F.silu(x, inplace=True)


def _attention(attn, x: torch.Tensor) -> torch.Tensor:
    """The hook's attention task (diffusers' ``Attention``): its own group norm again, then attention in the tile."""
    b, c, h, w = x.shape
    states = x.view(b, c, h * w).transpose(1, 2)
    if attn.group_norm is not None:
        states = attn.group_norm(states.transpose(1, 2)).transpose(1, 2)
    query, key, value = attn.to_q(states), attn.to_k(states), attn.to_v(states)
    head_dim = key.shape[-1] // attn.heads
    query, key, value = (t.view(b, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
    out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
    out = out.transpose(1, 2).reshape(b, -1, attn.heads * head_dim).to(query.dtype)
    out = attn.to_out[1](attn.to_out[0](out))
    return out.transpose(-1, -2).reshape(b, c, h, w)


def _resnet_tasks(block) -> list[list]:
    shortcut = block.conv_shortcut if block.in_channels != block.out_channels else (lambda x: x)
    return [["store_res", shortcut], ["pre_norm", block.norm1], ["silu", _silu], ["conv1", block.conv1],
            ["pre_norm", block.norm2], ["silu", _silu], ["conv2", block.conv2], ["add_res", None]]


def _mid_tasks(mid) -> list[list]:
    tasks = _resnet_tasks(mid.resnets[0])
    for attn, resnet in zip(mid.attentions, mid.resnets[1:], strict=True):
        tasks += [["store_res", lambda x: x], ["pre_norm", attn.group_norm],
                  ["attn", lambda x, attn=attn: _attention(attn, x)], ["add_res", None]]
        tasks += _resnet_tasks(resnet)
    return tasks


def build_tasks(net, is_decoder: bool) -> list[list]:
    """The hook's ``build_task_queue`` for a diffusers ``Encoder`` or ``Decoder``."""
    tasks = [["conv_in", net.conv_in]]
    if is_decoder:
        tasks += _mid_tasks(net.mid_block)
    for block in net.up_blocks if is_decoder else net.down_blocks:
        for resnet in block.resnets:
            tasks += _resnet_tasks(resnet)
        sampler = block.upsamplers if is_decoder else block.downsamplers
        if sampler is not None:
            tasks.append(["upsample" if is_decoder else "downsample", sampler[0]])
    if not is_decoder:
        tasks += _mid_tasks(net.mid_block)
    return tasks + [["pre_norm", net.conv_norm_out], ["silu", _silu], ["conv_out", net.conv_out]]


def _var_mean(x: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    b, c = x.shape[:2]
    grouped = x.contiguous().view(1, b * groups, c // groups, *x.shape[2:])
    return torch.var_mean(grouped, dim=[0, 2, 3, 4], unbiased=False)


class SharedGroupNorm:
    """One GroupNorm's statistics gathered over all tiles (the hook's ``GroupNormParam``)."""

    def __init__(self):
        self.vars, self.means, self.pixels = [], [], []
        self.norm = None

    def add(self, tile: torch.Tensor, norm: torch.nn.GroupNorm) -> None:
        var, mean = _var_mean(tile, norm.num_groups)
        self.vars.append(var)
        self.means.append(mean)
        self.pixels.append(tile.shape[2] * tile.shape[3])
        self.norm = norm

    def summary(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """The group norm every tile then applies: variance and mean averaged with pixel-count weights."""
        if not self.vars:
            return None
        var, mean = torch.vstack(self.vars), torch.vstack(self.means)
        pixels = torch.tensor(self.pixels, dtype=torch.float32, device=var.device) / max(self.pixels)
        weights = (pixels / pixels.sum()).unsqueeze(1)
        var, mean = (var * weights).sum(dim=0), (mean * weights).sum(dim=0)
        norm = self.norm

        def apply(x: torch.Tensor) -> torch.Tensor:
            b, c = x.shape[:2]
            grouped = x.contiguous().view(1, b * norm.num_groups, c // norm.num_groups, *x.shape[2:])
            out = F.batch_norm(grouped, mean, var, training=False, momentum=0, eps=1e-6).view(b, c, *x.shape[2:])
            if norm.weight is not None:
                out *= norm.weight.view(1, -1, 1, 1)
            if norm.bias is not None:
                out += norm.bias.view(1, -1, 1, 1)
            return out

        return apply


def crop_valid_region(x: torch.Tensor, box: list[int], target: list[int], is_decoder: bool) -> torch.Tensor:
    """The part of a finished tile that its output box keeps."""
    padded = [v * 8 if is_decoder else v // 8 for v in box]
    margin = [target[i] - padded[i] for i in range(4)]
    return x[:, :, margin[2] : x.size(2) + margin[3], margin[0] : x.size(3) + margin[1]]


@torch.no_grad()
def tiled_forward(net, x: torch.Tensor, tile: int, is_decoder: bool) -> torch.Tensor:
    """``net(x)`` for a diffusers ``Encoder`` / ``Decoder`` as XPSR's hooked forward computes it."""
    if runs_whole(x, tile, is_decoder):
        return net(x)
    pad = DECODER_PAD if is_decoder else ENCODER_PAD
    return run_tiles(net, x, *split_tiles(x.shape[2], x.shape[3], tile, pad, is_decoder), is_decoder)


@torch.no_grad()
def run_tiles(net, x: torch.Tensor, boxes: list[list[int]], targets: list[list[int]], is_decoder: bool) -> torch.Tensor:
    """The hook's task-queue run (``vae_tile_forward``) over the given tiles: input boxes, output boxes."""
    device = x.device
    n, _, height, width = x.shape
    tiles: list[torch.Tensor | None] = [x[:, :, b[2] : b[3], b[0] : b[1]].cpu() for b in boxes]
    template = build_tasks(net, is_decoder)
    queues = [[list(task) for task in template] for _ in tiles]
    out_h, out_w = (height * 8, width * 8) if is_decoder else (height // 8, width // 8)
    result, done, forward = None, 0, True
    while True:
        shared = SharedGroupNorm()
        for i in range(len(tiles)) if forward else reversed(range(len(tiles))):
            t, queue = tiles[i].to(device), queues[i]
            while queue:
                name, op = queue.pop(0)
                if name == "pre_norm":
                    shared.add(t, op)
                    break
                if name == "store_res":
                    slot = next(task for task in queue if task[0] == "add_res")
                    slot[1] = op(t).cpu()
                elif name == "add_res":
                    t += op.to(device)
                else:
                    t = op(t)
            if not queue:
                tiles[i] = None
                done += 1
                if result is None:
                    result = torch.zeros((n, t.shape[1], out_h, out_w), device=device)
                b = targets[i]
                result[:, :, b[2] : b[3], b[0] : b[1]] = crop_valid_region(t, boxes[i], b, is_decoder)
            elif (i == len(tiles) - 1 and forward) or (i == 0 and not forward):
                forward = not forward
                tiles[i] = t
            else:
                tiles[i] = t.cpu()
        if done == len(tiles):
            return result
        norm = shared.summary()
        if norm is not None:
            for queue in queues:
                queue.insert(0, ["apply_norm", norm])


def runs_whole(x: torch.Tensor, tile: int, is_decoder: bool) -> bool:
    """Whether the hook runs the network's own forward on ``x`` (its larger side within ``tile + 2 * pad``)."""
    return max(x.shape[-2:]) <= 2 * (DECODER_PAD if is_decoder else ENCODER_PAD) + tile


def xpsr_encode(vae, pixels: torch.Tensor, tile: int):
    """``vae.encode(pixels).latent_dist`` with the encoder hooked as XPSR's test.py hooks it."""
    if runs_whole(pixels, tile, is_decoder=False):
        return vae.encode(pixels).latent_dist
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    h = tiled_forward(vae.encoder, pixels, tile, is_decoder=False).to(pixels.dtype)
    return DiagonalGaussianDistribution(vae.quant_conv(h) if vae.quant_conv is not None else h)


def xpsr_decode(vae, z: torch.Tensor, tile: int) -> torch.Tensor:
    """``vae.decode(z).sample`` with the decoder hooked as XPSR's test.py hooks it."""
    if runs_whole(z, tile, is_decoder=True):
        return vae.decode(z).sample
    if vae.post_quant_conv is not None:
        z = vae.post_quant_conv(z)
    return tiled_forward(vae.decoder, z, tile, is_decoder=True)
