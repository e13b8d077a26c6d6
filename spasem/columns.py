"""Helpers for the column batches (``dict[str, np.ndarray]``) that every stage takes and returns."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np


def object_array(items: Sequence[Any]) -> np.ndarray:
    """A 1-D object array, even when the items are equal-shaped arrays numpy would stack."""
    arr = np.empty(len(items), dtype=object)
    for i, item in enumerate(items):
        arr[i] = item
    return arr


def as_list(column: Any) -> list[Any]:
    """Rows of a column, whether a stacked N-D array, an object array or a list."""
    if isinstance(column, np.ndarray) and column.dtype != object:
        return [column[i] for i in range(column.shape[0])]
    return list(column)


def take_rows(column: Any, rows: Sequence[int]) -> np.ndarray:
    """``column[rows]``, a view instead of a copy when the rows are consecutive (a stage's micro-batch)."""
    rows = list(rows)
    arr = np.asarray(column)
    if rows and rows == list(range(rows[0], rows[0] + len(rows))):
        return arr[rows[0] : rows[0] + len(rows)]
    return arr[rows]


def stack_or_objects(items: Sequence[np.ndarray]) -> np.ndarray:
    """Stack equal-shaped arrays into one tensor column; fall back to an object column."""
    if items and all(isinstance(x, np.ndarray) and x.shape == items[0].shape for x in items):
        return np.stack(items)
    return object_array(items)


def stable_seed(*parts: object) -> int:
    """A 63-bit seed from ``parts``; unlike ``hash()`` it is the same in every process and run."""
    digest = hashlib.blake2b(":".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1
