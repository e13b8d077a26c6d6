"""The per-row failure protocol every stage shares: failures are data, never a crash of the batch.

A batch carries ``status`` ("ok" or "error") and ``error`` ("<stage>: <Type>: <message>") columns.
A stage skips rows that are already rejected, runs each remaining row, and turns an exception into
that row's status and error; the other rows go on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np

from spasem.columns import as_list, object_array

log = logging.getLogger(__name__)
T = TypeVar("T")


def error_message(exc: BaseException) -> str:
    """``Type: message`` on one line, at most 300 characters of message."""
    text = " ".join(str(exc).split())[:300]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class RowStatus:
    """The ``status``/``error`` columns of one batch, updated as a stage runs its rows."""

    def __init__(self, batch: dict[str, Any], n: int):
        self.status = [str(s) for s in as_list(batch["status"])] if "status" in batch else ["ok"] * n
        self.error = [str(e) for e in as_list(batch["error"])] if "error" in batch else [""] * n

    def ok(self, i: int) -> bool:
        return self.status[i] == "ok"

    def fail(self, i: int, stage: str, exc: BaseException, key: Any = None) -> None:
        self.status[i], self.error[i] = "error", f"{stage}: {error_message(exc)}"
        log.warning("%s failed on %s: %s", stage, key if key is not None else f"row {i}", self.error[i])

    def run(self, i: int, stage: str, fn: Callable[..., T], *args: Any,
            catch: tuple[type[BaseException], ...] = (Exception,), key: Any = None) -> T | None:
        """``fn(*args)`` for row ``i`` if it is still ok; ``None`` when it was rejected before or fails now."""
        if not self.ok(i):
            return None
        try:
            return fn(*args)
        except catch as exc:  # a failure is data: this row becomes a reject, the batch goes on
            self.fail(i, stage, exc, key)
            return None

    def columns(self) -> dict[str, np.ndarray]:
        return {"status": object_array(self.status), "error": object_array(self.error)}
