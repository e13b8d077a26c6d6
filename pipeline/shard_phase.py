"""Prepare's shard phase: listing -> shard plan -> read -> crop -> degrade -> ``OUT/pairs`` shards.

Each shard is built by one Ray task from its own slice of the sorted listing, so pixels never move
between workers, a shard's bytes depend only on its inputs, and a killed run resumes by skipping
shards whose done marker exists.
"""

from __future__ import annotations

import json
import logging
import math
import time
from typing import Any

import numpy as np

from spasem.columns import as_list
from spasem.config import Config
from spasem.degrade.params import preset_usm
from spasem.shards import PAIRS_DIR, ShardWriter, encode_pair
from stages.crop import RandomCrop
from stages.degrade import Degrade
from stages.read import ReadImages, reject_reason

log = logging.getLogger(__name__)


def plan_shards(files: list[str], shard_size: int, crops_per_image: int) -> list[list[str]]:
    """Split the sorted listing into shards of at most ``shard_size`` samples (before rejects)."""
    per_shard = max(1, shard_size // crops_per_image)
    files = sorted(files)
    return [files[i : i + per_shard] for i in range(0, len(files), per_shard)]


def shard_stages(cfg: Config) -> dict[str, str]:
    """What produced a pairs shard; recorded in its done marker."""
    return {
        "read": "pillow",
        "crop": f"random-{cfg.data.hr_size}" + ("+hflip" if cfg.data.hflip else ""),
        # "+usm": the stored HR is the sharpened crop (markers before sharpening existed lack it)
        "degrade": f"{cfg.degradation.preset}-x{cfg.data.scale}" + ("+usm" if _sharpens(cfg) else ""),
    }


def _sharpens(cfg: Config) -> bool:
    return preset_usm(cfg.degradation.preset, cfg.degradation.usm) is not None


class ShardBuilder:
    """Builds whole shards: the read, crop and degrade stages run in a loop inside one task."""

    def __init__(self, cfg: Config):
        data = cfg.data
        self.cfg = cfg
        self.input = cfg.storage.open(cfg.input)
        self.output = cfg.storage.open(cfg.output).child(PAIRS_DIR)
        self.read = ReadImages(self.input, data.max_pixels, data.effective_min_size, data.max_bytes)
        self.crop = RandomCrop(data.hr_size, data.crops_per_image, data.seed, data.hflip)
        self.degrade = Degrade(data, cfg.degradation)

    def build(self, index: int, files: list[str]) -> dict[str, Any]:
        """Build and write shard ``index``; returns its marker plus per-stage seconds."""
        timings: dict[str, float] = {}
        batch: dict[str, Any] = {"path": np.asarray(files, dtype=object)}
        for name, stage in (("read", self.read), ("crop", self.crop), ("degrade", self.degrade)):
            start = time.perf_counter()
            batch = stage(batch)
            timings[name] = time.perf_counter() - start
        start = time.perf_counter()
        writer = ShardWriter(self.output, index)
        rejected_sources = set()
        for row in _rows(batch):
            if row["status"] != "ok":
                if row["source"] not in rejected_sources:
                    writer.reject(row["source"], reject_reason(row["error"]))
                    rejected_sources.add(row["source"])
                continue
            x, y, w, h = (int(v) for v in row["crop"])
            record = {
                "key": row["key"],
                "source": row["source"],
                "crop": [x, y, w, h],
                "flip": bool(row["flip"]),
                "seed": int(row["seed"]),
                "degradation": json.loads(row["degradation"]),
            }
            writer.write(encode_pair(row["key"], row["hr"], row["lr"], record))
        marker = writer.close(shard_stages(self.cfg))
        timings["write"] = time.perf_counter() - start
        errors = {str(r["source"]): str(r["error"]) for r in _rows(batch) if r["status"] != "ok"}
        for source, error in sorted(errors.items()):
            log.warning("rejected %s: %s", source, error)
        return {**marker, "seconds": timings}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = [self.build(int(i), json.loads(f)) for i, f in zip(batch["shard"], batch["files"], strict=True)]
        return {"result": np.asarray([json.dumps(r) for r in results], dtype=object)}


def _rows(batch: dict[str, Any]) -> list[dict[str, Any]]:
    columns = {k: as_list(v) for k, v in batch.items() if k != "path"}
    n = len(next(iter(columns.values()))) if columns else 0
    return [{k: v[i] for k, v in columns.items()} for i in range(n)]


def run_shard_phase(cfg: Config, plan: list[list[str]], pending: list[int]) -> list[dict[str, Any]]:
    """Build the ``pending`` shards of ``plan`` on Ray Data tasks; returns their results."""
    import ray

    if not pending:
        return []
    items = [{"shard": i, "files": json.dumps(plan[i])} for i in pending]
    # a fixed-size pool that fills the cluster: an autoscaling pool starts at one actor and the
    # short shard tasks finish before it grows
    cpus = ray.cluster_resources().get("CPU", 1)
    actors = cfg.prepare.shard_parallelism or max(1, math.floor(cpus / cfg.prepare.read_num_cpus))
    actors = min(actors, len(items))
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(
        ShardBuilder,
        fn_constructor_kwargs={"cfg": cfg},
        batch_size=1,
        batch_format="numpy",
        num_cpus=cfg.prepare.read_num_cpus,
        compute=ray.data.ActorPoolStrategy(size=actors),
    )
    return [json.loads(row["result"]) for row in ds.iter_rows()]
