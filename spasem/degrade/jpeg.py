"""JPEG as the papers' data scripts compress: BasicSR's ``DiffJPEG`` maths, in numpy.

XPSR's ``utils_data/make_train.py``, SeeSR's ``make_paired_data.py``, Real-ESRGAN's training model
and StableSR all compress with ``basicsr/utils/diffjpeg.py`` (``DiffJPEG(differentiable=False)``),
not with libjpeg, and draw the quality as a float (``uniform_(30, 95)``). Its steps, which this
module follows one by one in float32:

- pad the image to a multiple of 16 with zeros (black) at the bottom and right;
- RGB * 255 -> YCbCr with JPEG's full-range matrix, chroma averaged over 2x2 pixels;
- 8x8 blocks of each plane minus 128 -> orthonormal DCT-II;
- divide by the quantization table times ``factor`` (quality q -> 5000 / q below 50, else
  200 - 2q, then / 100; no rounding or clamping of the table, unlike libjpeg), round half to even,
  multiply back; the tables are the standard JPEG tables *transposed*, as DiffJPEG writes them;
- inverse DCT + 128, chroma repeated 2x2, YCbCr -> RGB, clamped to [0, 255], / 255, padding cut.

The output is float (not on the 8-bit grid), as DiffJPEG's is. It equals DiffJPEG's up to float32
rounding (the sums run in another order), which can move a coefficient across a rounding
boundary now and then; ``tests/test_degrade.py`` compares with outputs of BasicSR's own code.
"""

from __future__ import annotations

from functools import lru_cache

import cv2
import numpy as np

_PAD = 16  # DiffJPEG pads to 16: the chroma planes are then whole blocks too

# the standard JPEG tables (ITU T.81 Annex K), row-major as the standard prints them
_LUMA = np.array([
    [16, 11, 10, 16, 24, 40, 51, 61], [12, 12, 14, 19, 26, 58, 60, 55], [14, 13, 16, 24, 40, 57, 69, 56],
    [14, 17, 22, 29, 51, 87, 80, 62], [18, 22, 37, 56, 68, 109, 103, 77], [24, 35, 55, 64, 81, 104, 113, 92],
    [49, 64, 78, 87, 103, 121, 120, 101], [72, 92, 95, 98, 112, 100, 103, 99],
], np.float32)
_CHROMA = np.full((8, 8), 99, np.float32)
_CHROMA[:4, :4] = [[17, 18, 24, 47], [18, 21, 26, 66], [24, 26, 56, 99], [47, 66, 99, 99]]
# DiffJPEG divides coefficient (vertical u, horizontal v) by table[u, v] of the *transposed* tables
Y_TABLE, C_TABLE = np.ascontiguousarray(_LUMA.T), np.ascontiguousarray(_CHROMA.T)

_TO_YCC = np.array([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]], np.float32)
_FROM_YCC = np.array([[1.0, 0.0, 1.402], [1.0, -0.344136, -0.714136], [1.0, 1.772, 0.0]], np.float32)


@lru_cache(maxsize=1)
def _dct() -> np.ndarray:
    """The 8-point orthonormal DCT-II matrix ``D`` (a block's coefficients are ``D @ block @ D.T``)."""
    k, n = np.meshgrid(np.arange(8), np.arange(8), indexing="ij")
    d = 0.5 * np.cos((2 * n + 1) * k * np.pi / 16)
    d[0] /= np.sqrt(2.0)
    return d.astype(np.float32)


def quality_factor(quality: float) -> np.float32:
    """DiffJPEG's table scale for ``quality``, computed in float32 as its float32 quality tensor does."""
    q = np.float32(quality)
    if not 0 < q < 100:  # at 100 the tables are all zero: DiffJPEG divides by zero
        raise ValueError(f"JPEG quality must be in (0, 100), got {quality}")
    scaled = np.float32(5000.0) / q if q < 50 else np.float32(200.0) - q * np.float32(2.0)
    return np.float32(scaled / np.float32(100.0))


def _quantized_round_trip(plane: np.ndarray, table: np.ndarray) -> np.ndarray:
    """One level-shifted plane (h, w multiples of 8, values around -128..127): DCT, quantize, round,
    dequantize, inverse DCT."""
    h, w = plane.shape
    d = _dct()
    # D @ block over the rows of each block row, then @ D.T over the columns of each block
    coef = np.matmul(d, plane.reshape(h // 8, 8, w)).reshape(h, w // 8, 8)
    coef = np.matmul(coef, d.T).reshape(h // 8, 8, w // 8, 8)
    step = np.broadcast_to(table[None, :, None, :], coef.shape)
    levels = np.round(np.divide(coef, step, out=coef), out=coef)
    coef = np.multiply(levels, step, out=levels).reshape(h, w // 8, 8)
    coef = np.matmul(coef, d).reshape(h // 8, 8, w)
    return np.matmul(d.T, coef).reshape(h, w)


@lru_cache(maxsize=2)
def _colour_matrices(bgr: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``cv2.transform`` matrices (offset last) from [0, 1] to level-shifted Y, to CbCr, and back to [0, 1].

    DiffJPEG's * 255, its +128 on the chroma and the -128 before each DCT, the +128 after each inverse
    DCT and the -128 on the chroma again, and the final / 255 are folded into the matrices (their
    shifts cancel but for +128 on Y): one pass each way, rounded a little differently from DiffJPEG's
    separate steps (float32 rounding, ~1e-7 of the output).
    """
    to_ycc = _TO_YCC.astype(np.float64) * 255.0
    to_y = np.zeros((1, 4), np.float64)
    to_y[0, :3], to_y[0, 3] = to_ycc[0], -128.0
    to_c = np.zeros((2, 4), np.float64)
    to_c[:, :3] = to_ycc[1:]
    back = np.zeros((3, 4), np.float64)
    back[:, :3] = _FROM_YCC.astype(np.float64) / 255.0
    back[:, 3] = 128.0 / 255.0
    if bgr:  # the pixels' channels in the other order: reorder the matrices instead
        to_y[:, :3], to_c[:, :3] = to_y[:, 2::-1], to_c[:, 2::-1]
        back = back[::-1]
    return to_y.astype(np.float32), to_c.astype(np.float32), np.ascontiguousarray(back, dtype=np.float32)


def diffjpeg(rgb: np.ndarray, quality: float, bgr: bool = False) -> np.ndarray:
    """BasicSR's ``DiffJPEG(differentiable=False)`` of an RGB float32 image in [0, 1] at ``quality``.

    ``rgb`` is ``(H, W, 3)``, already clamped to [0, 1] as the data scripts clamp before it; the
    result is float32 ``(H, W, 3)`` in [0, 1], RGB. ``bgr``: the image and the result are in BGR
    order (the colour matrices are reordered instead of the pixels).
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 RGB image, got shape {rgb.shape}")
    to_y, to_c, back = _colour_matrices(bool(bgr))
    factor = quality_factor(quality)
    h, w = rgb.shape[:2]
    hp, wp = -(-h // _PAD) * _PAD, -(-w // _PAD) * _PAD
    padded = np.asarray(rgb, np.float32)
    if (hp, wp) != (h, w):  # DiffJPEG pads with zeros (black) at the bottom and right
        padded = cv2.copyMakeBorder(padded, 0, hp - h, 0, wp - w, cv2.BORDER_CONSTANT, value=(0.0, 0.0, 0.0))
    planes = [_quantized_round_trip(cv2.transform(padded, to_y), Y_TABLE * factor)[:h, :w]]
    # chroma of the 2x2 means (avg_pool2d; INTER_AREA at exactly half is that mean, and the colour
    # transform is linear, so it commutes with the mean), then repeated 2x2
    chroma = cv2.transform(cv2.resize(padded, (wp // 2, hp // 2), interpolation=cv2.INTER_AREA), to_c)
    c_table = C_TABLE * factor
    for plane in cv2.split(chroma):
        small = _quantized_round_trip(plane, c_table)
        planes.append(cv2.resize(small, (wp, hp), interpolation=cv2.INTER_NEAREST)[:h, :w])
    out = cv2.transform(cv2.merge(planes), back)
    return np.clip(out, 0.0, 1.0, out=out)
