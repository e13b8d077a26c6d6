"""Image operations of the Real-ESRGAN degradation on float32 HxWx3 images in [0, 1].

Pure functions of (image, explicit parameters, ``np.random.Generator``), mirroring the torch ops the
papers' data scripts run: BasicSR's ``filter2D`` (reflect padding), ``F.interpolate`` (area /
bilinear / bicubic, :func:`interpolate`), Gaussian and Poisson noise (colour or
gray) and BasicSR's ``DiffJPEG`` (:func:`diffjpeg`, ``spasem/degrade/jpeg.py``), with OpenCV and
numpy doing the pixel work single-threaded. Images are in OpenCV's BGR channel order: the JPEG's
colour matrix and the gray (luma) noise need to know which channel is which.

:func:`resize` and :func:`jpeg` (OpenCV's resize, libjpeg at an integer quality) are what shards
made before the torch ops used (records without ``ops``); they stay so those LRs re-synthesize.
"""

from __future__ import annotations

import math
from functools import lru_cache

import cv2
import numpy as np
from scipy import special

from spasem.degrade.banded import matmul_rows, row_blocks
from spasem.degrade.jpeg import diffjpeg

INTERP_FLAGS = {"area": cv2.INTER_AREA, "bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC}
_BORDER = cv2.BORDER_REFLECT_101  # what torch's F.pad(mode="reflect") in BasicSR's filter2D does
_KERNEL_TOL = 5e-7  # L1 mass a blur may drop or approximate: below float32 rounding of the sums
_TINY_TAP = 1e-12  # taps below this are zeroed (441 of them sum to far less than _KERNEL_TOL)
_DFT_TAPS = 130  # OpenCV's filter2D uses a DFT from this many taps on (float32 in and out)
_BANDED_MAX = 19  # larger kernels go through _fft_blur instead of bands


def uint8_to_unit(img: np.ndarray) -> np.ndarray:
    """uint8 -> float32 in [0, 1]."""
    return np.multiply(img, np.float32(1.0 / 255.0), dtype=np.float32)


def unit_to_uint8(img: np.ndarray, nonnegative: bool = False) -> np.ndarray:
    """float32 in [0, 1] -> uint8, clipped and rounded (BasicSR's final ``clamp((x * 255).round())``).

    ``nonnegative``: the caller knows no value is below -0.5 / 255 (clipped noise output, the USM
    blend), so the pass that zeroes negatives can go: they would round to 0 all the same.
    """
    # convertScaleAbs rounds and saturates at 255 in one pass; it takes |x|, so negatives are zeroed first
    return cv2.convertScaleAbs(img if nonnegative else np.maximum(img, np.float32(0.0)), alpha=255.0)


# ------------------------------------------------------------------------------------------- blur


def trim_kernel(kernel: np.ndarray, tol: float = _KERNEL_TOL) -> np.ndarray:
    """Zero the negligible taps and drop outer rings while the |mass| removed stays within ``tol``.

    Zeroing matters for speed, not only size: the far taps of a narrow Gaussian are float32
    denormals, which make every multiply in ``filter2D`` several times slower.
    """
    tiny = np.abs(kernel) < _TINY_TAP
    dropped = float(np.abs(kernel[tiny]).sum())
    kernel = np.where(tiny, np.float32(0.0), kernel).astype(np.float32)
    while kernel.shape[0] > 1:
        inner = kernel[1:-1, 1:-1]
        ring = float(np.abs(kernel).sum() - np.abs(inner).sum())
        if dropped + ring > tol:
            break
        dropped += ring
        kernel = inner
    return np.ascontiguousarray(kernel)


def _separable(kernel: np.ndarray, tol: float) -> list[tuple[np.ndarray, np.ndarray]] | None:
    """The fewest rank-1 terms (column, row) whose sum is within ``tol`` (L1) of the kernel, or None."""
    u, s, vt = np.linalg.svd(kernel.astype(np.float64))
    for rank in range(1, len(s) + 1):
        approx = (u[:, :rank] * s[:rank]) @ vt[:rank]
        if np.abs(approx - kernel).sum() <= tol:
            root = np.sqrt(s[:rank])
            return [((u[:, i] * root[i]).astype(np.float32), (vt[i] * root[i]).astype(np.float32))
                    for i in range(rank)]
    return None


# Rough single-thread cost, ns per output pixel of an RGB float32 image (measured with OpenCV 5.0 at
# 96..768 px): it only chooses how to apply a kernel, every way gives the same image within _KERNEL_TOL.
# The choice depends on the kernel and the image size alone, so a record re-synthesizes the same way.
def _separable_cost(size: int, rank: int) -> float:
    return rank * (2.2 + 0.6 * size)  # one sepFilter2D per rank-1 term


def _direct_cost(size: int) -> float:
    taps = size * size
    if taps < _DFT_TAPS:
        return 0.5 + 0.14 * taps
    return 0.16 * taps if size <= _BANDED_MAX else math.inf  # banded; OpenCV's own DFT path loses to _fft_blur


def _fft_shape(h: int, w: int, size: int) -> tuple[int, int]:
    return cv2.getOptimalDFTSize(h + size - 1), cv2.getOptimalDFTSize(w + size - 1)


def _fft_cost(h: int, w: int, size: int) -> float:
    nh, nw = _fft_shape(h, w, size)
    return 33.0 * nh * nw / (h * w)


def _banded_filter(img: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """2-D correlation in row bands of fewer than 130 taps each.

    OpenCV switches ``filter2D`` to its DFT path at 130 taps, which on one thread is 2-3x slower
    than the direct form for 13..19-tap kernels; bands keep every call direct.
    """
    size, r, h = kernel.shape[0], kernel.shape[0] // 2, img.shape[0]
    rows = max(1, (_DFT_TAPS - 1) // size)
    padded = cv2.copyMakeBorder(img, r, r, 0, 0, _BORDER)  # rows here; filter2D pads the columns
    out = None
    for top in range(0, size, rows):
        band = np.ascontiguousarray(kernel[top : top + rows])
        slab = padded[top : top + h + band.shape[0] - 1]
        part = cv2.filter2D(slab, -1, band, anchor=(r, 0), borderType=_BORDER)[:h]
        out = part.copy() if out is None else np.add(out, part, out=out)
    return out


def _fft_blur(img: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """2-D correlation by real DFTs (OpenCV's packed CCS form), reflect-101 borders, channel by channel.

    The image is padded by the kernel radius (reflect-101) up to a fast DFT size and the flipped
    kernel wrapped around the origin; outputs at the padded image's centre read no wrapped pixels,
    so the circular convolution equals the correlation there. Float32 DFTs round to ~5e-7.
    """
    h, w = img.shape[:2]
    size, r = kernel.shape[0], kernel.shape[0] // 2
    nh, nw = _fft_shape(h, w, size)
    wrapped = np.zeros((nh, nw), np.float32)
    wrapped[np.ix_((np.arange(size) - r) % nh, (np.arange(size) - r) % nw)] = kernel[::-1, ::-1]
    spectrum = cv2.dft(wrapped)
    # a smooth kernel's spectrum decays into float32 denormals, which make the products ~5x slower
    spectrum[np.abs(spectrum) < _TINY_TAP] = 0.0
    padded = cv2.copyMakeBorder(img, r, nh - h - r, r, nw - w - r, _BORDER)
    planes = []
    for plane in cv2.split(padded):
        freq = cv2.dft(plane)
        cv2.mulSpectrums(freq, spectrum, 0, freq)
        planes.append(cv2.dft(freq, flags=cv2.DFT_INVERSE | cv2.DFT_SCALE | cv2.DFT_REAL_OUTPUT)[r : r + h, r : r + w])
    return cv2.merge(planes)


def blur(img: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Correlate each channel with ``kernel`` (reflect-101 borders), as BasicSR's ``filter2D``.

    The kernel is first trimmed of negligible tails, then applied whichever way is cheapest for its
    size, rank and the image size: a sum of separable terms (each within ``_KERNEL_TOL`` of the
    kernel), the direct form, or DFTs. All agree with the direct correlation to float32 rounding.
    """
    kernel = trim_kernel(np.asarray(kernel, np.float32))
    size = kernel.shape[0]
    if size == 1:
        return img * kernel[0, 0]
    h, w = img.shape[:2]
    terms = _separable(kernel, _KERNEL_TOL) if size > 5 else None
    costs = {
        "separable": _separable_cost(size, len(terms)) if terms is not None else math.inf,
        "direct": _direct_cost(size),
        "fft": _fft_cost(h, w, size) if size > 5 else math.inf,
    }
    way = min(costs, key=costs.get)
    if way == "separable":
        out = None
        for col, row in terms:
            part = cv2.sepFilter2D(img, -1, row, col, borderType=_BORDER)
            out = part if out is None else np.add(out, part, out=out)
        return out
    if way == "fft":
        return _fft_blur(img, kernel)
    if size * size < _DFT_TAPS:
        return cv2.filter2D(img, -1, kernel, borderType=_BORDER)
    return _banded_filter(img, kernel)


# ----------------------------------------------------------------------------------------- resize


def resize(img: np.ndarray, height: int, width: int, interp: str) -> np.ndarray:
    """Resize to ``height`` x ``width`` with area / bilinear / bicubic (half-pixel centres, as torch)."""
    if interp not in INTERP_FLAGS:
        raise ValueError(f"unknown interpolation {interp!r}; expected one of {', '.join(INTERP_FLAGS)}")
    height, width = max(1, int(height)), max(1, int(width))
    if (height, width) == img.shape[:2]:
        return img
    return cv2.resize(img, (width, height), interpolation=INTERP_FLAGS[interp])


def _adaptive_mean_rows(img: np.ndarray, size: int) -> np.ndarray:
    """``adaptive_avg_pool`` along axis 0: output ``i`` is the mean of inputs floor(i n / size) .. ceil((i + 1) n / size) - 1."""
    n = img.shape[0]
    i = np.arange(size)
    start, end = (i * n) // size, -((-(i + 1) * n) // size)
    count = end - start
    taps = start[:, None] + np.arange(int(count.max()))[None, :]
    inside = taps < end[:, None]
    matrix = np.zeros((size, n), np.float32)
    matrix[np.broadcast_to(i[:, None], taps.shape)[inside], taps[inside]] = np.repeat(
        np.float32(1.0) / count.astype(np.float32), count)
    return matmul_rows(matrix, row_blocks(matrix), np.ascontiguousarray(img))


def interpolate(img: np.ndarray, interp: str, size: tuple[int, int] | None = None,
                scale: float | None = None) -> np.ndarray:
    """torch's ``F.interpolate`` of an HxWx3 float32 image, to ``size`` (height, width) or by ``scale``.

    What the data scripts call, done by OpenCV and numpy (torch's CPU kernels take 5-15x longer);
    ``tests/test_degrade.py`` holds it to torch's own op. The two calls differ: by ``scale_factor``
    (the first order's resize) the output is ``floor(size * scale)`` and the source coordinates are
    ``(x + 0.5) / scale - 0.5``, whatever the floor cut off, where a resize to a size maps by the
    ratio of the sizes. OpenCV's ``fx``/``fy`` resize maps the same way (its size rounds instead of
    flooring: the extra row or column is cut). ``area`` is ``adaptive_avg_pool2d`` (whole-pixel
    bins), not OpenCV's ``INTER_AREA``.
    """
    if interp not in INTERP_FLAGS:
        raise ValueError(f"unknown interpolation {interp!r}; expected one of {', '.join(INTERP_FLAGS)}")
    if (size is None) == (scale is None):
        raise ValueError("interpolate takes a size or a scale, not both")
    h, w = img.shape[:2]
    if size is None:  # torch: floor(float(size) * scale)
        height, width = math.floor(h * scale), math.floor(w * scale)
    else:
        height, width = int(size[0]), int(size[1])
    height, width = max(1, height), max(1, width)
    if (height, width) == (h, w):
        if scale in (None, 1.0) or interp != "bicubic":
            return img  # the identity: torch copies (bilinear, area) and so does OpenCV at the same size
        # torch's bicubic still maps by 1 / scale at the same size, which OpenCV's copy would skip
        # (a scale just above 1: floor(h * scale) == h); rare enough to call torch's own op
        import torch
        from torch.nn import functional as F

        pixels = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None]
        out = F.interpolate(pixels, scale_factor=scale, mode="bicubic", align_corners=False)
        return np.ascontiguousarray(out[0].permute(1, 2, 0).numpy())
    if interp == "area":
        return cv2.transpose(_adaptive_mean_rows(cv2.transpose(_adaptive_mean_rows(img, height)), width))
    if size is not None:
        return cv2.resize(img, (width, height), interpolation=INTERP_FLAGS[interp])
    out = cv2.resize(img, None, fx=scale, fy=scale, interpolation=INTERP_FLAGS[interp])
    return out[:height, :width] if out.shape[:2] != (height, width) else out


# ------------------------------------------------------------------------------------------ noise


def _words(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` raw 32-bit words, in the order ``rng.random(n, dtype=np.float32)`` consumes them."""
    return rng.bit_generator.random_raw((n + 1) // 2).view(np.uint32)[:n]


def normal(rng: np.random.Generator, shape: tuple[int, ...], sigma: float = 1.0) -> np.ndarray:
    """N(0, sigma**2) float32 draws by the Box-Muller transform of 24-bit uniforms (|z| <= 5.77 sigma).

    Exact in distribution up to float32 rounding and the 24-bit tail cut, and several times faster
    than numpy's float32 ziggurat. The uniforms are ``rng.random(dtype=np.float32)``'s, taken from
    the raw words in bulk (numpy converts them one call at a time), and ``sigma`` scales the radii,
    half as many values as the draws.
    """
    n = math.prod(shape)
    half = (n + 1) // 2
    words = _words(rng, 2 * half)
    words >>= np.uint32(8)  # k in [0, 2**24): the uniform is k / 2**24, as numpy's next_float
    # 1 - u = (2**24 - k) / 2**24 in (0, 1], exactly: the log stays finite
    radius = np.multiply(np.subtract(np.uint32(1 << 24), words[:half]), np.float32(2.0**-24), dtype=np.float32)
    np.log(radius, out=radius)
    radius *= np.float32(-2.0)
    np.sqrt(radius, out=radius)
    radius *= np.float32(sigma)
    # 2 pi u, rounded once: float32(2 pi) / 2**24 is exact in float32
    angle = np.multiply(words[half:], np.float32(np.float32(2.0 * math.pi) * np.float32(2.0**-24)), dtype=np.float32)
    out = np.empty(2 * half, np.float32)
    np.multiply(radius, np.cos(angle), out=out[:half])
    np.multiply(radius, np.sin(angle, out=angle), out=out[half:])
    return out[:n].reshape(shape)


def add_gaussian_noise(img: np.ndarray, sigma: float, gray: bool, rng: np.random.Generator) -> np.ndarray:
    """Add N(0, sigma/255) noise, one field shared by the channels when ``gray``; clip to [0, 1]."""
    noise = normal(rng, img.shape[:2] if gray else img.shape, sigma / 255.0)
    out = np.add(img, noise[..., None]) if gray else np.add(img, noise, out=noise)
    return np.clip(out, 0.0, 1.0, out=out)


_GUIDE_BITS = 11  # 2048 guide buckets per level: ~3% of draws land in a bucket holding a CDF jump
_AMBIGUOUS = 0x8000  # flag bit in the guide table: the bucket holds a jump, compare with the CDF


@lru_cache(maxsize=9)
def _poisson_tables(vals: int) -> tuple[np.ndarray, np.ndarray, int]:
    """CDF of Poisson(level * vals / 255) for the 256 levels, and a flagged guide table over u."""
    lam = np.arange(256, dtype=np.float64) * vals / 255.0
    width = int(lam[-1] + 12 * math.sqrt(lam[-1]) + 24)
    cdf = special.pdtr(np.arange(width, dtype=np.float64)[None, :], lam[:, None])
    cdf[:, -1] = 1.0  # the tail beyond 12 sigma is below float64 resolution anyway
    buckets = np.arange(1 << _GUIDE_BITS, dtype=np.float64) * 2.0**-_GUIDE_BITS
    # u = (raw + 0.5) / 2**32, so a bucket holds u in [b / M + 2**-33, (b + 1) / M - 2**-33]
    low = np.stack([np.searchsorted(row, buckets + 2.0**-33, side="right") for row in cdf])
    high = np.stack([np.searchsorted(row, buckets + 2.0**-_GUIDE_BITS - 2.0**-33, side="right") for row in cdf])
    guide = low | np.where(low != high, _AMBIGUOUS, 0)
    return cdf.ravel(), guide.astype(np.uint16).ravel(), width


def poisson_levels(levels: np.ndarray, vals: int, rng: np.random.Generator) -> np.ndarray:
    """Poisson(level * vals / 255) draws for uint8 ``levels`` by inverse-CDF sampling, as float32.

    The same distribution as ``rng.poisson(levels / 255 * vals)`` (u has 32-bit resolution) at
    ~3x the speed: with only 256 distinct rates, a guide table answers ~97% of draws in one lookup.
    """
    cdf, guide, width = _poisson_tables(int(vals))
    n = levels.size
    raw = _words(rng, n).reshape(levels.shape)
    index = np.left_shift(levels, np.uint32(_GUIDE_BITS), dtype=np.uint32)
    index |= raw >> np.uint32(32 - _GUIDE_BITS)
    draws = guide.take(index)
    todo = np.flatnonzero(draws.view(np.int16) < 0)  # the _AMBIGUOUS bit is the sign bit
    draws &= np.uint16(_AMBIGUOUS - 1)
    flat = draws.reshape(-1)
    if todo.size:  # step past the CDF jumps inside those buckets
        k = levels.reshape(-1)[todo].astype(np.intp) * width
        u = raw.reshape(-1)[todo] * 2.0**-32 + 2.0**-33
        pos = k + flat[todo]
        active = np.arange(todo.size)
        while active.size:
            active = active[cdf[pos[active]] <= u[active]]
            pos[active] += 1
        flat[todo] = pos - k
    return draws.astype(np.float32)


def add_poisson_noise(img: np.ndarray, scale: float, gray: bool, rng: np.random.Generator) -> np.ndarray:
    """BasicSR ``generate_poisson_noise``: shot noise at 2**ceil(log2(#grey levels)) photons; clip."""
    base = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY) if gray else img
    levels = unit_to_uint8(base)  # rounded to 8 bits to count the levels, as BasicSR does
    hist = cv2.calcHist([levels.reshape(levels.shape[0], -1)], [0], None, [256], [0, 256])
    vals = 2 ** math.ceil(math.log2(max(int(np.count_nonzero(hist)), 1)))
    # noise = scale * (X / vals - level / 255), X ~ Poisson(level / 255 * vals)
    shift = np.multiply(levels, np.float32(-scale / 255.0), dtype=np.float32)
    noise = cv2.scaleAdd(poisson_levels(levels, vals, rng), scale / vals, shift)
    out = np.add(img, noise[..., None]) if gray else np.add(img, noise, out=noise)
    return np.clip(out, 0.0, 1.0, out=out)


# ------------------------------------------------------------------------------------------- JPEG


def jpeg_torch(img: np.ndarray, quality: float, clipped: bool = False) -> np.ndarray:
    """BasicSR's ``DiffJPEG`` of a BGR image at a float ``quality`` (clamped to [0, 1] first, as the scripts)."""
    if not clipped:
        img = np.clip(img, 0.0, 1.0)
    return diffjpeg(img, quality, bgr=True)


def jpeg(img: np.ndarray, quality: int, clipped: bool = False) -> np.ndarray:
    """JPEG round trip of a BGR image through libjpeg at ``quality`` (clipped to [0, 1] first, as BasicSR).

    ``clipped``: ``img`` is already in [0, 1] (the noise steps clip), which saves a pass.
    """
    ok, data = cv2.imencode(".jpg", unit_to_uint8(img, clipped), [int(cv2.IMWRITE_JPEG_QUALITY), int(quality)])
    if not ok:
        raise RuntimeError(f"JPEG encoding failed at quality {quality} for an image of shape {img.shape}")
    return uint8_to_unit(cv2.imdecode(data, cv2.IMREAD_COLOR))
