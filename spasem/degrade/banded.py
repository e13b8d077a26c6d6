"""Products of a banded matrix with an image along its first axis, run as BLAS products of the band.

A linear filter or resampling along axis 0 of an ``(A, B, C)`` image is ``M @ X`` with ``X`` viewed
as ``(A, B * C)`` and ``M`` the ``(A', A)`` matrix of the weights. When each output row reads only a
few neighbouring input rows, ``M`` is a band: cut into blocks of output rows, each block's product
touches only the columns its rows use, and BLAS runs those small products at full speed. The other
axis is the same product after a transpose (``cv2.transpose``, one fast pass).
"""

from __future__ import annotations

import numpy as np

BLOCK = 32  # output rows per product: small enough to skip most zeros, large enough for BLAS to run fast

Blocks = tuple[tuple[int, int, int, int], ...]


def row_blocks(matrix: np.ndarray, block: int = BLOCK) -> Blocks:
    """The row blocks ``(r0, r1, lo, hi)`` of ``matrix``: rows ``r0:r1`` are zero outside columns ``lo:hi``."""
    blocks = []
    for r0 in range(0, matrix.shape[0], block):
        r1 = min(matrix.shape[0], r0 + block)
        used = np.flatnonzero(matrix[r0:r1].any(axis=0))
        lo, hi = (int(used[0]), int(used[-1]) + 1) if used.size else (0, 0)
        blocks.append((r0, r1, lo, hi))
    return tuple(blocks)


def matmul_rows(matrix: np.ndarray, blocks: Blocks, img: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``matrix @ img`` along axis 0 of a C-contiguous float32 image, one BLAS product per row block."""
    flat = img.reshape(img.shape[0], -1)
    if out is None:
        out = np.empty((matrix.shape[0], *img.shape[1:]), np.float32)
    flat_out = out.reshape(matrix.shape[0], -1)
    for r0, r1, lo, hi in blocks:
        if hi > lo:
            np.matmul(matrix[r0:r1, lo:hi], flat[lo:hi], out=flat_out[r0:r1])
        else:
            flat_out[r0:r1] = 0.0
    return out
