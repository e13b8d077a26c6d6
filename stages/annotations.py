"""What the annotation stages share: the row-failure protocol, shard-aligned micro-batches, members.

Every annotation stage subclasses :class:`AnnotationStage`: it implements ``process`` for a list of
row indices and ``placeholder`` for rows it does not process (already rejected, or failed here), so
each output column has one value per row. A micro-batch that raises is retried row by row; a row that
still fails becomes ``status="error"``, ``error="<stage>: <message>"`` and the rest go on.

Micro-batches never cross a shard (the ``shard`` column, when present) and are cut from the start of
the shard, so a row's neighbours, and so its numbers, are the same whether its shard ran in a full
run or alone in a resumed one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from spasem.columns import as_list, object_array, stack_or_objects
from stages.rows import RowStatus

log = logging.getLogger(__name__)


class AnnotationStage:
    """Base of the annotation stages: ``__call__(batch) -> batch`` with per-row failures as data."""

    name = "stage"

    def __init__(self, batch_size: int):
        self.batch_size = max(1, int(batch_size))

    def process(self, batch: dict[str, Any], rows: list[int]) -> list[dict[str, Any]]:
        """Output values for ``rows`` (one dict per row, in order)."""
        raise NotImplementedError

    def placeholder(self, batch: dict[str, Any], row: int) -> dict[str, Any]:
        """Output values for a row that was not processed (same types and shapes as ``process``)."""
        raise NotImplementedError

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        start = time.perf_counter()
        n = len(batch["key"])
        rows = RowStatus(batch, n)
        results: list[dict[str, Any] | None] = [None] * n
        for chunk in self._chunks(batch, rows.status):
            for i, out in self._run(batch, chunk):
                if isinstance(out, BaseException):
                    rows.fail(i, self.name, out, batch["key"][i])
                else:
                    results[i] = out
        filled = [r if r is not None else self.placeholder(batch, i) for i, r in enumerate(results)]
        columns = {}
        for name in filled[0] if filled else []:
            values = [r[name] for r in filled]
            columns[name] = stack_or_objects(values) if isinstance(values[0], np.ndarray) else object_array(values)
        # per-row share of this call's time: the phase sums it into seconds and samples/s per stage
        columns[f"seconds_{self.name}"] = np.full(n, (time.perf_counter() - start) / max(n, 1))
        return {**batch, **columns, **rows.columns()}

    def _chunks(self, batch: dict[str, Any], status: list[str]) -> Iterator[list[int]]:
        shards = as_list(batch["shard"]) if "shard" in batch else [0] * len(status)
        groups: dict[Any, list[int]] = {}
        for i, s in enumerate(shards):
            groups.setdefault(int(s), []).append(i)
        for rows in groups.values():
            # cut from the shard's start over all rows, so a reject does not shift its neighbours
            for start in range(0, len(rows), self.batch_size):
                chunk = [i for i in rows[start : start + self.batch_size] if status[i] == "ok"]
                if chunk:
                    yield chunk

    def _run(self, batch: dict[str, Any], rows: list[int]):
        try:
            outs = self.process(batch, rows)
            if len(outs) != len(rows):
                raise RuntimeError(f"{self.name} returned {len(outs)} results for {len(rows)} rows")
            yield from zip(rows, outs, strict=True)
            return
        except Exception as exc:  # noqa: BLE001 - isolate the bad row below
            if len(rows) == 1:
                yield rows[0], exc
                return
        for i in rows:
            try:
                yield i, self.process(batch, [i])[0]
            except Exception as exc:  # noqa: BLE001 - a failure is data: this row becomes a reject
                yield i, exc
