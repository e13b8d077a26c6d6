"""Blur kernels of the Real-ESRGAN degradation: pure functions of explicit parameters.

The maths follows BasicSR's ``basicsr/data/degradations.py`` (bivariate Gaussian, generalized
Gaussian, plateau, circular low-pass "sinc"); there is no sampling here and no global RNG. Every
kernel is odd-sized, float32 and normalized to sum 1. Kernels are applied as a correlation
(``cv2.filter2D``), as BasicSR's ``filter2D`` does.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from scipy import special

GAUSSIAN_KINDS = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")
KERNEL_KINDS = (*GAUSSIAN_KINDS, "sinc")
ISOTROPIC_KINDS = ("iso", "generalized_iso", "plateau_iso")


def _check_size(size: int) -> None:
    if size < 1 or size % 2 != 1:
        raise ValueError(f"kernel size must be a positive odd number, got {size}")


@lru_cache(maxsize=16)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Integer coordinates centred on the middle tap (x along columns, y along rows), float64."""
    ax = np.arange(-(size // 2), size // 2 + 1, dtype=np.float64)
    xx, yy = np.meshgrid(ax, ax)
    xx.flags.writeable = False
    yy.flags.writeable = False
    return xx, yy


def _quadratic_form(size: int, sigma_x: float, sigma_y: float, rotation: float) -> np.ndarray:
    """``[x y] Sigma^-1 [x y]^T`` on the grid, with Sigma = U diag(sx^2, sy^2) U^T (BasicSR sigma_matrix2)."""
    if sigma_x <= 0 or sigma_y <= 0:
        raise ValueError(f"kernel sigmas must be positive, got ({sigma_x}, {sigma_y})")
    xx, yy = _grid(size)
    c, s = math.cos(rotation), math.sin(rotation)
    u = np.array([[c, -s], [s, c]])
    inv = np.linalg.inv(u @ np.diag([sigma_x**2, sigma_y**2]) @ u.T)
    return inv[0, 0] * xx * xx + (inv[0, 1] + inv[1, 0]) * xx * yy + inv[1, 1] * yy * yy


def _normalized(kernel: np.ndarray) -> np.ndarray:
    kernel = kernel / kernel.sum()
    return kernel.astype(np.float32)


def gaussian_kernel(size: int, sigma_x: float, sigma_y: float, rotation: float = 0.0) -> np.ndarray:
    """Bivariate (an)isotropic Gaussian; isotropic when ``sigma_x == sigma_y``."""
    _check_size(size)
    return _normalized(np.exp(-0.5 * _quadratic_form(size, sigma_x, sigma_y, rotation)))


def generalized_gaussian_kernel(
    size: int, sigma_x: float, sigma_y: float, rotation: float, beta: float
) -> np.ndarray:
    """Generalized Gaussian ``exp(-0.5 * q**beta)``; beta = 1 is the Gaussian."""
    _check_size(size)
    return _normalized(np.exp(-0.5 * np.power(_quadratic_form(size, sigma_x, sigma_y, rotation), beta)))


def plateau_kernel(size: int, sigma_x: float, sigma_y: float, rotation: float, beta: float) -> np.ndarray:
    """Plateau-shaped kernel ``1 / (1 + q**beta)``."""
    _check_size(size)
    return _normalized(1.0 / (np.power(_quadratic_form(size, sigma_x, sigma_y, rotation), beta) + 1.0))


def sinc_kernel(size: int, omega: float) -> np.ndarray:
    """Circular low-pass (2-D sinc, BasicSR ``circular_lowpass_kernel``) with cut-off ``omega`` in radians."""
    _check_size(size)
    if not 0 < omega <= math.pi:
        raise ValueError(f"sinc cut-off omega must be in (0, pi], got {omega}")
    xx, yy = _grid(size)
    r = np.hypot(xx, yy)
    # the limit at r = 0 is omega^2 / (4 pi); np.where keeps the 0/0 out of the other branch
    safe = np.where(r == 0, 1.0, r)
    kernel = np.where(r == 0, omega**2 / (4 * math.pi), omega * special.j1(omega * safe) / (2 * math.pi * safe))
    return _normalized(kernel)


def make_kernel(
    kind: str,
    size: int,
    sigma_x: float | None = None,
    sigma_y: float | None = None,
    rotation: float | None = 0.0,
    beta: float | None = None,
    omega: float | None = None,
) -> np.ndarray:
    """The kernel of one family by name; isotropic kinds use ``sigma_x`` and ignore ``sigma_y``/rotation."""
    if kind not in KERNEL_KINDS:
        raise ValueError(f"unknown kernel kind {kind!r}; expected one of {', '.join(KERNEL_KINDS)}")
    if kind == "sinc":
        if omega is None:
            raise ValueError("a sinc kernel needs omega")
        return sinc_kernel(size, omega)
    if sigma_x is None:
        raise ValueError(f"a {kind} kernel needs sigma_x")
    if kind in ISOTROPIC_KINDS:
        sigma_y, rotation = sigma_x, 0.0
    elif sigma_y is None:
        raise ValueError(f"a {kind} kernel needs sigma_y")
    rotation = rotation or 0.0
    if kind in ("iso", "aniso"):
        return gaussian_kernel(size, sigma_x, sigma_y, rotation)
    if beta is None:
        raise ValueError(f"a {kind} kernel needs beta")
    if kind.startswith("generalized"):
        return generalized_gaussian_kernel(size, sigma_x, sigma_y, rotation, beta)
    return plateau_kernel(size, sigma_x, sigma_y, rotation, beta)


def pulse_kernel(size: int = 1) -> np.ndarray:
    """The identity kernel (BasicSR's "pulse": no final sinc)."""
    _check_size(size)
    kernel = np.zeros((size, size), np.float32)
    kernel[size // 2, size // 2] = 1.0
    return kernel
