"""Colour correction of a diffusion output toward its input, as StableSR and PASD do it.

``wavelet``: keep the output's high frequencies and take the low frequencies (colour, tone) from the
reference, with StableSR's five-level dilated 3x3 blur (support 31 px, so it can run per tile: the
tiled decoder's blend weights are zero on a tile's outer 1/4 overlap). ``adain``: match each channel's
mean and standard deviation over the whole image to the reference's; image-wide statistics, so the
tiled path accumulates them in bands (``ChannelStats``) and applies the affine map in bands.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F

WAVELET_LEVELS = 5
WAVELET_SUPPORT = 2**WAVELET_LEVELS - 1  # pixels of context one output pixel depends on
_KERNEL = torch.tensor([[0.0625, 0.125, 0.0625], [0.125, 0.25, 0.125], [0.0625, 0.125, 0.0625]])


def wavelet_blur(image: torch.Tensor, radius: int) -> torch.Tensor:
    """One level of the à trous wavelet: a 3x3 binomial blur dilated by ``radius`` (replicate borders)."""
    c = image.shape[1]
    kernel = _KERNEL.to(image.device, image.dtype)[None, None].repeat(c, 1, 1, 1)
    padded = F.pad(image, (radius, radius, radius, radius), mode="replicate")
    return F.conv2d(padded, kernel, groups=c, dilation=radius)


def wavelet_decomposition(image: torch.Tensor, levels: int = WAVELET_LEVELS) -> tuple[torch.Tensor, torch.Tensor]:
    """(high frequencies, low frequencies); they sum to ``image``."""
    high = torch.zeros_like(image)
    for i in range(levels):
        low = wavelet_blur(image, 2**i)
        high += image - low
        image = low
    return high, image


def wavelet_fix(content: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``content``'s detail on ``reference``'s colours ([B, 3, H, W], same size, any range)."""
    high, _ = wavelet_decomposition(content.float())
    _, low = wavelet_decomposition(reference.float())
    return (high + low).to(content.dtype)


def frequency_merge(content: torch.Tensor, reference: torch.Tensor, levels: float) -> torch.Tensor:
    """The first ``levels`` wavelet bands (finest first) from ``content``, the rest from ``reference``.

    ``levels`` is continuous in [0, WAVELET_LEVELS + 1]: the band at the cut is mixed by its fraction;
    ``WAVELET_LEVELS`` equals ``wavelet_fix``, ``WAVELET_LEVELS + 1`` returns ``content``. Both images
    are decomposed and the differences of their bands added to ``reference``.
    """
    if not 0.0 <= levels <= WAVELET_LEVELS + 1:
        raise ValueError(f"levels={levels} must lie in [0, {WAVELET_LEVELS + 1}]")
    out = reference.float().clone()
    c, r = content.float(), reference.float()
    for i in range(WAVELET_LEVELS + 1):
        weight = min(max(levels - i, 0.0), 1.0)
        if weight == 0.0:
            break
        if i < WAVELET_LEVELS:
            c_low, r_low = wavelet_blur(c, 2**i), wavelet_blur(r, 2**i)
            out += weight * ((c - c_low) - (r - r_low))
            c, r = c_low, r_low
        else:  # the residual (colour and tone)
            out += weight * (c - r)
    return out.to(content.dtype)


def _mean_std(x: torch.Tensor, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    flat = x.float().flatten(2)
    return flat.mean(dim=2)[..., None, None], (flat.var(dim=2) + eps).sqrt()[..., None, None]


def adain_fix(content: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """AdaIN: ``content`` with each channel's mean and std replaced by ``reference``'s (sizes may differ)."""
    c_mean, c_std = _mean_std(content)
    r_mean, r_std = _mean_std(reference)
    return ((content.float() - c_mean) / c_std * r_std + r_mean).to(content.dtype)


class ChannelStats:
    """Per-channel mean and (unbiased) std of an image seen in pieces, in float64."""

    def __init__(self, channels: int = 3):
        self.n = 0
        self.sum = np.zeros(channels, np.float64)
        self.sumsq = np.zeros(channels, np.float64)

    def update(self, pixels: np.ndarray) -> None:
        """Add ``pixels`` ([..., C], any dtype)."""
        flat = pixels.reshape(-1, pixels.shape[-1]).astype(np.float64)
        self.n += flat.shape[0]
        self.sum += flat.sum(axis=0)
        self.sumsq += np.square(flat).sum(axis=0)

    @property
    def mean(self) -> np.ndarray:
        return self.sum / max(self.n, 1)

    def std(self, eps: float = 1e-5) -> np.ndarray:
        var = (self.sumsq - self.n * np.square(self.mean)) / max(self.n - 1, 1)
        return np.sqrt(np.maximum(var, 0.0) + eps)


def adain_fix_uint8(image: np.ndarray, reference: ChannelStats, rows: int = 256, truncate: bool = False) -> None:
    """AdaIN on an RGB uint8 image in place, in bands of ``rows`` so no float copy of it exists.

    ``truncate``: back to uint8 by truncation, as XPSR's ``adain_color_fix`` does (torchvision's
    ``ToPILImage`` of a float tensor is ``mul(255).byte()``); else rounded to nearest.
    """
    stats = ChannelStats(image.shape[-1])
    for band in _bands(image, rows):
        stats.update(band)
    gain = reference.std() / stats.std()
    bias = reference.mean - stats.mean * gain
    to_int = np.floor if truncate else np.rint  # clipped at 0 first, so floor is truncation
    for band in _bands(image, rows):
        band[...] = to_int(np.clip(band * gain + bias, 0, 255)).astype(np.uint8)


def _bands(image: np.ndarray, rows: int) -> Iterable[np.ndarray]:
    for y in range(0, image.shape[0], rows):
        yield image[y : y + rows]
