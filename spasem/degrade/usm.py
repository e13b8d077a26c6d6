"""Unsharp masking of the HR target: BasicSR's ``usm_sharp``, with its two Gaussian blurs as matrix products.

BasicSR v1.4.2 ``basicsr/utils/img_process_util.py`` (``usm_sharp`` for numpy, ``USMSharp`` for torch,
the same maths; XPSR, SeeSR and StableSR vendor it unchanged): blur the image with a 51-tap Gaussian
(sigma 8 by OpenCV's rule), keep ``img + weight * (img - blur)`` where ``|img - blur| * 255 >
threshold``, and soften that choice by blurring the mask with the same Gaussian.

Why matrix products: a separable blur along one axis of an ``(A, B, 3)`` image is ``T @ X`` with
``X`` viewed as ``(A, 3B)`` and ``T`` the ``A x A`` banded matrix of the taps, reflect-101 borders
folded in. Cut into row blocks, each product touches only the band, and BLAS runs it at several times
the speed of OpenCV's 51-tap row filter on one thread. The other axis is the same product after a
transpose. The results equal ``cv2.GaussianBlur`` up to float32 rounding (the sums run in another
order): ``tests/test_degrade.py`` holds them to it.
"""

from __future__ import annotations

from functools import lru_cache

import cv2
import numpy as np

from spasem.degrade.banded import Blocks, matmul_rows, row_blocks


def reflect_101(index: np.ndarray, size: int) -> np.ndarray:
    """OpenCV's BORDER_REFLECT_101 (torch's ``reflect`` pad) for any index, reflecting as often as needed."""
    if size == 1:
        return np.zeros_like(index)
    period = 2 * (size - 1)
    index = np.mod(index, period)
    return np.where(index >= size, period - index, index)


@lru_cache(maxsize=8)
def _band(size: int, radius: int) -> tuple[np.ndarray, Blocks]:
    """The ``size x size`` matrix of the blur along one axis, and its row blocks (r0, r1, lo, hi).

    Row ``i`` holds the taps ``cv2.getGaussianKernel(radius, 0)`` around column ``i``, taps that fall
    outside the image added onto the columns reflect-101 maps them to. Block rows ``r0:r1`` read only
    columns ``lo:hi``; the rest of their row is zero.
    """
    taps = cv2.getGaussianKernel(radius, 0, ktype=cv2.CV_64F).ravel()
    half = radius // 2
    matrix = np.zeros((size, size), np.float64)
    rows = np.repeat(np.arange(size), radius)
    cols = reflect_101(rows + np.tile(np.arange(-half, half + 1), size), size)
    np.add.at(matrix, (rows, cols), np.tile(taps, size))
    matrix = matrix.astype(np.float32)
    matrix.flags.writeable = False
    return matrix, row_blocks(matrix)


def _blur_rows(img: np.ndarray, radius: int, out: np.ndarray | None = None) -> np.ndarray:
    """The Gaussian along axis 0 of a C-contiguous float32 ``(A, B, C)`` image (reflect-101 borders)."""
    matrix, blocks = _band(img.shape[0], radius)
    return matmul_rows(matrix, blocks, img, out)


def gaussian_blur_transposed(img_t: np.ndarray, radius: int, out: np.ndarray | None = None) -> np.ndarray:
    """``cv2.GaussianBlur(img, (radius, radius), 0)`` of ``img``, given its transpose ``img_t`` (W, H, 3).

    Taking the transpose saves one: blur along W, transpose (cv2, one fast pass), blur along H.
    ``out`` (H, W, 3) float32 receives the result when given.
    """
    return _blur_rows(cv2.transpose(_blur_rows(img_t, radius)), radius, out)


def _threshold(threshold: float) -> np.float32:
    """The largest float32 ``t`` with ``d > t`` exactly when ``np.float32(d) * 255 > threshold``.

    BasicSR scales the residual before comparing; comparing against the matching float32 bound gives
    the same mask with one pass less (the product is monotone in ``d``).
    """
    t = np.float32(threshold / 255.0)
    while np.float32(t * np.float32(255.0)) > threshold:
        t = np.nextafter(t, np.float32(0.0))
    while not np.float32(np.nextafter(t, np.float32(1.0)) * np.float32(255.0)) > threshold:
        t = np.nextafter(t, np.float32(1.0))
    return t


def usm_sharp(img: np.ndarray, weight: float = 0.5, radius: int = 50, threshold: float = 10) -> np.ndarray:
    """BasicSR ``usm_sharp``: unsharp masking where the detail is strong, float32 HxWx3 in [0, 1] out.

    ``sharp = img + weight * (img - blur)``, kept where ``|img - blur| * 255 > threshold`` through a
    blurred mask. ``img`` is float32 in [0, 1] as BasicSR takes it, or uint8 (read as ``img / 255``).
    The channels are independent, so the order (RGB or BGR) does not matter. The maths and the order
    of operations are BasicSR's; the blend is written ``img + mask * (sharp - img)``, which changes
    the result only by float32 rounding.
    """
    if img.ndim != 3:
        raise ValueError(f"expected an HxWxC image, got shape {img.shape}")
    if radius % 2 == 0:
        radius += 1
    scale = np.float32(1.0 / 255.0) if img.dtype == np.uint8 else np.float32(1.0)
    # cv2.transpose moves the pixels in one fast pass; numpy's strided copy is several times slower
    img_t = np.multiply(cv2.transpose(img), scale, dtype=np.float32)
    unit = np.multiply(img, scale, dtype=np.float32)
    blurred = gaussian_blur_transposed(img_t, radius)
    residual = cv2.subtract(unit, blurred)
    strong = np.greater(cv2.absdiff(unit, blurred, dst=blurred), _threshold(threshold))
    np.copyto(img_t, cv2.transpose(strong.view(np.uint8)))  # the mask, transposed, in img_t's memory
    soft = gaussian_blur_transposed(img_t, radius, out=blurred)
    sharp = cv2.scaleAdd(residual, float(weight), unit, dst=residual)
    np.clip(sharp, 0.0, 1.0, out=sharp)
    return cv2.accumulateProduct(soft, cv2.subtract(sharp, unit, dst=sharp), unit)
