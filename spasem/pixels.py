"""Pixel-range maths in one place: uint8 images <-> the [-1, 1] floats the VAE, UNet and ControlNet use.

Images on disk and in batches are uint8 ``[..., H, W, 3]``; models see float ``[B, 3, H, W]`` in
[-1, 1]. The scale is 127.5 both ways, and the way back rounds half away from zero after clamping,
so a round trip of a uint8 image is exact.
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np
import torch

HALF_RANGE = 127.5


def to_signed(images: torch.Tensor) -> torch.Tensor:
    """uint8 (or 0..255 float) tensor ``[B,3,H,W]`` -> float32 in [-1, 1]."""
    # in place on one fresh copy (never the caller's tensor): the same values as div().sub(), one float buffer
    return images.to(torch.float32, copy=True).div_(HALF_RANGE).sub_(1.0)


def to_signed_np(images: np.ndarray) -> np.ndarray:
    """uint8 array (any shape) -> float32 in [-1, 1]."""
    return images.astype(np.float32) / HALF_RANGE - 1.0


# to_signed of every uint8 value, computed by to_signed itself so a lookup gives the very same floats
_SIGNED_LUT = to_signed(torch.arange(256, dtype=torch.uint8)).numpy()


def hwc_to_signed(images: np.ndarray) -> torch.Tensor:
    """uint8 ``[B,H,W,3]`` array -> float32 tensor ``[B,3,H,W]`` in [-1, 1] (channels-last memory).

    One table lookup per value (OpenCV's ``LUT`` writes float32 straight from uint8): the same values
    as :func:`to_signed` at less than half the CPU of its convert, divide and subtract passes.
    """
    if images.dtype != np.uint8 or images.ndim != 4 or images.size == 0:
        return to_signed(torch.from_numpy(np.require(images, requirements=("C", "W"))).permute(0, 3, 1, 2))
    flat = np.ascontiguousarray(images).reshape(-1, images.shape[2] * images.shape[3])
    return torch.from_numpy(cv2.LUT(flat, _SIGNED_LUT)).view(images.shape).permute(0, 3, 1, 2)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float tensor in [-1, 1] (any shape) -> uint8 tensor, clamped and rounded."""
    return ((images.detach().float() + 1.0) * HALF_RANGE).round().clamp(0, 255).to(torch.uint8)


def signed_to_hwc(images: Any) -> np.ndarray:
    """float ``[B,3,H,W]`` in [-1, 1] (tensor or array) -> uint8 ``[B,H,W,3]`` array."""
    tensor = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.asarray(images, np.float32))
    return to_uint8(tensor).permute(0, 2, 3, 1).cpu().numpy()
