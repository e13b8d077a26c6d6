"""Image operations of the Real-ESRGAN degradation on float32 HxWx3 images in [0, 1].

Pure functions of (image, explicit parameters, ``np.random.Generator``), mirroring BasicSR's
``filter2D`` (reflect padding), ``F.interpolate`` (area / bilinear / bicubic), Gaussian and Poisson
noise (colour or gray) and JPEG, with OpenCV doing the pixel work single-threaded. Images are in
OpenCV's BGR channel order, as in BasicSR's numpy path: libjpeg and the gray (luma) noise need to
know which channel is which, and working in BGR saves a colour conversion per JPEG.
"""

from __future__ import annotations

import math
from functools import lru_cache

import cv2
import numpy as np
from scipy import special

INTERP_FLAGS = {"area": cv2.INTER_AREA, "bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC}
_BORDER = cv2.BORDER_REFLECT_101  # what torch's F.pad(mode="reflect") in BasicSR's filter2D does
_KERNEL_TOL = 5e-7  # L1 mass a blur may drop or approximate: below float32 rounding of the sums
_TINY_TAP = 1e-12  # taps below this are zeroed (441 of them sum to far less than _KERNEL_TOL)
_DFT_TAPS = 130  # OpenCV's filter2D uses a DFT from this many taps on (float32 in and out)
_BANDED_MAX = 19  # larger kernels: OpenCV's DFT beats the bands (measured on one thread)


def uint8_to_unit(img: np.ndarray) -> np.ndarray:
    """uint8 -> float32 in [0, 1]."""
    return np.multiply(img, np.float32(1.0 / 255.0), dtype=np.float32)


def unit_to_uint8(img: np.ndarray) -> np.ndarray:
    """float32 in [0, 1] -> uint8, clipped and rounded (BasicSR's final ``clamp((x * 255).round())``)."""
    # convertScaleAbs rounds and saturates at 255 in one pass; negatives must be zeroed first
    return cv2.convertScaleAbs(np.maximum(img, np.float32(0.0)), alpha=255.0)


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


def _direct_cost(size: int) -> float:
    """Rough ms per 512^2 RGB float32 image on one thread, for choosing how to apply a kernel."""
    taps = size * size
    if taps < _DFT_TAPS:
        return 0.045 * taps
    return 0.055 * taps if size <= _BANDED_MAX else 24.0  # banded direct form, else OpenCV's DFT


def _separable_cost(size: int, rank: int) -> float:
    return rank * (1.0 + 0.2 * size)


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


def blur(img: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Correlate each channel with ``kernel`` (reflect-101 borders), as BasicSR's ``filter2D``.

    The kernel is first trimmed of negligible tails and, where cheaper, applied as a sum of
    separable terms; each changes the result by at most ``_KERNEL_TOL`` times the image range.
    """
    kernel = trim_kernel(np.asarray(kernel, np.float32))
    size = kernel.shape[0]
    if size == 1:
        return img * kernel[0, 0]
    direct = _direct_cost(size)
    terms = _separable(kernel, _KERNEL_TOL) if size > 5 else None
    if terms is not None and _separable_cost(size, len(terms)) < direct:
        out = None
        for col, row in terms:
            part = cv2.sepFilter2D(img, -1, row, col, borderType=_BORDER)
            out = part if out is None else np.add(out, part, out=out)
        return out
    if size * size < _DFT_TAPS or size > _BANDED_MAX:
        return cv2.filter2D(img, -1, kernel, borderType=_BORDER)
    return _banded_filter(img, kernel)


# -------------------------------------------------------------------------------------------- USM


@lru_cache(maxsize=4)
def _usm_kernel(radius: int) -> np.ndarray:
    """The 1-D taps of ``cv2.GaussianBlur(img, (radius, radius), 0)`` on float32 images."""
    return cv2.getGaussianKernel(radius, 0, ktype=cv2.CV_32F)


def usm_sharp(img: np.ndarray, weight: float = 0.5, radius: int = 50, threshold: float = 10) -> np.ndarray:
    """BasicSR ``usm_sharp``: unsharp masking where the detail is strong, float32 HxWx3 in [0, 1] out.

    ``sharp = img + weight * (img - blur)``, kept where ``|img - blur| * 255 > threshold`` through a
    blurred mask. ``img`` is float32 in [0, 1] as BasicSR takes it, or uint8 (read as ``img / 255``).
    The maths and the order of operations are BasicSR's; the blurs read uint8 straight into float32
    (one conversion pass less) and the blend is written ``img + mask * (sharp - img)``: both change
    the result only by float32 rounding.
    """
    if radius % 2 == 0:
        radius += 1
    taps = _usm_kernel(radius)
    if img.dtype == np.uint8:
        blurred = cv2.sepFilter2D(img, cv2.CV_32F, taps, taps / np.float32(255.0), borderType=_BORDER)
        img = uint8_to_unit(img)
    else:
        blurred = cv2.sepFilter2D(img, -1, taps, taps, borderType=_BORDER)  # = GaussianBlur((r, r), 0)
    residual = cv2.subtract(img, blurred)
    detail = np.multiply(cv2.absdiff(img, blurred), np.float32(255.0))  # numpy: cv2's scalar path is 3x slower
    strong = cv2.compare(detail, float(threshold), cv2.CMP_GT)
    soft = cv2.sepFilter2D(strong, cv2.CV_32F, taps, taps / np.float32(255.0), borderType=_BORDER)  # 255 -> 1
    sharp = cv2.scaleAdd(residual, float(weight), img)
    np.clip(sharp, 0.0, 1.0, out=sharp)
    return cv2.add(img, cv2.multiply(soft, cv2.subtract(sharp, img, dst=sharp), dst=sharp))


# ----------------------------------------------------------------------------------------- resize


def resize(img: np.ndarray, height: int, width: int, interp: str) -> np.ndarray:
    """Resize to ``height`` x ``width`` with area / bilinear / bicubic (half-pixel centres, as torch)."""
    if interp not in INTERP_FLAGS:
        raise ValueError(f"unknown interpolation {interp!r}; expected one of {', '.join(INTERP_FLAGS)}")
    height, width = max(1, int(height)), max(1, int(width))
    if (height, width) == img.shape[:2]:
        return img
    return cv2.resize(img, (width, height), interpolation=INTERP_FLAGS[interp])


# ------------------------------------------------------------------------------------------ noise


def standard_normal(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """N(0, 1) float32 draws by the Box-Muller transform of 24-bit uniforms (|z| <= 5.77).

    Exact in distribution up to float32 rounding and the 24-bit tail cut, and ~2x faster here
    than numpy's float32 ziggurat, which took a sixth of the degradation's time.
    """
    n = math.prod(shape)
    half = (n + 1) // 2
    u = rng.random(2 * half, dtype=np.float32)
    radius = np.subtract(np.float32(1.0), u[:half])  # (0, 1]: log stays finite
    radius = np.sqrt(np.log(radius, out=radius) * np.float32(-2.0))
    angle = np.multiply(u[half:], np.float32(2.0 * math.pi))
    out = np.empty(2 * half, np.float32)
    np.multiply(radius, np.cos(angle), out=out[:half])
    np.multiply(radius, np.sin(angle, out=angle), out=out[half:])
    return out[:n].reshape(shape)


def add_gaussian_noise(img: np.ndarray, sigma: float, gray: bool, rng: np.random.Generator) -> np.ndarray:
    """Add N(0, sigma/255) noise, one field shared by the channels when ``gray``; clip to [0, 1]."""
    noise = standard_normal(rng, img.shape[:2] if gray else img.shape)
    noise *= np.float32(sigma / 255.0)
    out = np.add(img, noise[..., None] if gray else noise, dtype=np.float32)
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
    raw = rng.bit_generator.random_raw((n + 1) // 2).view(np.uint32)[:n].reshape(levels.shape)
    index = levels.astype(np.uint32)
    index <<= np.uint32(_GUIDE_BITS)
    index |= raw >> np.uint32(32 - _GUIDE_BITS)
    draws = guide.take(index)
    todo = np.flatnonzero(draws >= _AMBIGUOUS)
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
    out = np.add(img, noise[..., None] if gray else noise, dtype=np.float32)
    return np.clip(out, 0.0, 1.0, out=out)


# ------------------------------------------------------------------------------------------- JPEG


def jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    """JPEG round trip of a BGR image through libjpeg at ``quality`` (clipped to [0, 1] first, as BasicSR)."""
    ok, data = cv2.imencode(".jpg", unit_to_uint8(img), [int(cv2.IMWRITE_JPEG_QUALITY), int(quality)])
    if not ok:
        raise RuntimeError(f"JPEG encoding failed at quality {quality} for an image of shape {img.shape}")
    return uint8_to_unit(cv2.imdecode(data, cv2.IMREAD_COLOR))
