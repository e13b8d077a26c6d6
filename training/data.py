"""Training data: WebDataset shards -> Ray Data (read, decode, batch) -> one stream per worker.

Order is a pure function of the shard listing, so a resumed run continues exactly where the last
checkpoint stopped. Worker ``r`` of ``W`` owns shards ``r, r+W, r+2W, ...`` (read in order, samples
in tar order), so it reads only its own bytes; one epoch is ``steps_per_epoch`` optimizer steps, the
same on every worker (the smallest stream sets it; the tail of longer streams waits for the next
epoch). A checkpoint records ``(epoch, epoch_step)``; on resume each worker drops its fully consumed
shards and filters out exactly the consumed keys of its current shard *before* decoding, so within an
epoch no sample is seen twice or skipped.

Ray's ``streaming_split`` hands blocks to whichever worker asks first, which makes the sample->step
mapping depend on timing; exact resume needs a deterministic mapping, hence one unsplit dataset per
worker, each still reaching its worker through ``ray.train.get_dataset_shard``.
Only ``.png``, ``.json`` and ``.npy`` members are decoded (``np.load(allow_pickle=False)``), never pickle.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from spasem.config import StorageConfig
from spasem.pixels import to_signed_np
from spasem.shards import (
    IMAGE_MEMBERS,
    NPY_MEMBERS,
    PAIRS_DIR,
    ShardInfo,
    decode_annotations,
    decode_member,
    list_shards,
    read_tar,
    split_holdout,
)

log = logging.getLogger(__name__)

TENSOR_MEMBERS = tuple(f"{name}.npy" for name in NPY_MEMBERS)
WANTED = IMAGE_MEMBERS + ("json", "caption.json", "boxes.json") + TENSOR_MEMBERS


class DataError(ValueError):
    """Shards that cannot feed the configured training run."""


@dataclass(frozen=True)
class ShardPlan:
    """The training shards in order, the optional members they carry, and where they live."""

    root: str
    shards: tuple[ShardInfo, ...]
    members: tuple[str, ...]
    val: tuple[ShardInfo, ...] = field(default=())

    def rank_shards(self, rank: int, world: int) -> tuple[ShardInfo, ...]:
        return self.shards[rank::world]

    def steps_per_epoch(self, world: int, rows_per_step: int) -> int:
        """Optimizer steps per epoch: every worker must fill each step, so the smallest stream decides."""
        if len(self.shards) < world:
            raise DataError(f"{len(self.shards)} training shards for {world} workers: each worker needs at least "
                            f"one shard; lower train.num_workers or write smaller shards (data.shard_size)")
        rows = min(sum(s.count for s in self.rank_shards(r, world)) for r in range(world))
        steps = rows // rows_per_step
        if steps == 0:
            raise DataError(f"the smallest worker stream has {rows} samples, fewer than one step "
                            f"(batch_size x grad_accum = {rows_per_step}); lower train.batch_size")
        return steps


def training_shards(uri: str, val_shards: int = 0, storage: StorageConfig | None = None) -> ShardPlan:
    """The finished shards under ``uri`` (a prepare output, its ``shards/`` folder or one tar), the last
    ``val_shards`` non-empty ones held out for validation."""
    folder, infos = list_shards((storage or StorageConfig()).open(uri))
    if not infos:
        raise DataError(f"no finished WebDataset shards (*.tar) under {uri}: run `python -m pipeline.prepare` first")
    if folder.uri.rstrip("/").endswith(f"/{PAIRS_DIR}"):
        log.warning("%s has no final shards: training on the unannotated pairs in %s", uri, folder.uri)
    if val_shards >= len(infos):
        raise DataError(f"train.val_shards={val_shards} leaves no training shards out of {len(infos)}")
    train, val = split_holdout(infos, val_shards)
    first = read_tar(folder.read(train[0].rel))[0][1]
    members = tuple(m for m in TENSOR_MEMBERS + ("caption.json", "boxes.json") if m in first)
    missing = [m for m in IMAGE_MEMBERS if m not in first]
    if missing:
        raise DataError(f"shard {folder.url(train[0].rel)} has no {missing} members: not a training shard")
    return ShardPlan(folder.uri, tuple(train), members, tuple(val))


def _select_member(fname: str) -> bool:
    # read only what training uses: unknown members (and anything pickled) never leave the tar
    return fname.partition(".")[2] in WANTED


class DecodeBatch:
    """Ray Data batch function: raw shard members -> training columns (decoded, normalized, padded)."""

    def __init__(self, members: tuple[str, ...], max_boxes: int):
        self.members = members
        self.max_boxes = max_boxes

    @staticmethod
    def _image(data: bytes) -> np.ndarray:
        return to_signed_np(decode_member("png", data)).transpose(2, 0, 1)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        n, k = len(batch["__key__"]), self.max_boxes
        out: dict[str, Any] = {"key": np.asarray([str(x) for x in batch["__key__"]], dtype=object)}
        out["hr"] = np.stack([self._image(b) for b in batch["hr.png"]])
        out["lr"] = np.stack([self._image(b) for b in batch["lr.png"]])
        rows = [decode_annotations({m: batch[m][i] for m in self.members}) for i in range(n)]
        phrases = np.empty(n, dtype=object)
        boxes = np.zeros((n, k, 4), np.float32)
        mask = np.zeros((n, k), np.float32)
        for i, row in enumerate(rows):
            names = row.get("phrases", [])[:k]
            coords = row.get("boxes", np.zeros((0, 4), np.float32))[: len(names)]
            boxes[i, : len(coords)] = coords
            mask[i, : len(coords)] = 1.0
            phrases[i] = names[: len(coords)] + [""] * (k - len(coords))
        out.update(caption_high=np.asarray([r.get("caption_high", "") for r in rows], dtype=object),
                   caption_low=np.asarray([r.get("caption_low", "") for r in rows], dtype=object),
                   phrases=phrases, boxes=boxes, box_mask=mask)
        for member in self.members:
            if member.endswith(".npy"):
                out[member[:-4]] = np.stack([r[member[:-4]] for r in rows])
        return out


def rank_dataset(plan: ShardPlan, rank: int, world: int, batch_size: int, grad_accum: int, skip_steps: int,
                 num_steps: int, max_boxes: int, storage: StorageConfig | None = None,
                 decode_num_cpus: float = 0.25):
    """Worker ``rank``'s stream: its shards in order, ``skip_steps`` steps dropped, ``num_steps`` steps long."""
    import ray

    rows_per_step = batch_size * grad_accum
    shards = list(plan.rank_shards(rank, world))
    skip = skip_steps * rows_per_step
    while shards and skip >= shards[0].count:
        skip -= shards[0].count
        shards.pop(0)
    if not shards or num_steps <= 0:
        raise DataError(f"worker {rank} has no samples left to read (skip {skip_steps} steps, {num_steps} to go)")
    consumed = frozenset(shards[0].keys[:skip])
    fs, root = (storage or StorageConfig()).arrow(plan.root)
    paths = [f"{root}/{s.rel}" if s.rel else root for s in shards]
    ds = ray.data.read_webdataset(paths, filesystem=fs, decoder=None, fileselect=_select_member,
                                  override_num_blocks=len(paths), num_cpus=decode_num_cpus)
    if consumed:  # before decoding: consumed samples cost a tar read, never a PNG decode
        ds = ds.filter(lambda row: row["__key__"] not in consumed, num_cpus=decode_num_cpus)
    ds = ds.limit(num_steps * rows_per_step)
    return ds.map_batches(DecodeBatch(plan.members, max_boxes), batch_size=batch_size, batch_format="numpy", num_cpus=decode_num_cpus)


def val_dataset(plan: ShardPlan, max_boxes: int, batch_size: int, storage: StorageConfig | None = None,
                decode_num_cpus: float = 0.25):
    """The held-out shards, decoded; every worker reads the same rows (ZeRO-3 needs all ranks in forward)."""
    import ray

    fs, root = (storage or StorageConfig()).arrow(plan.root)
    ds = ray.data.read_webdataset([f"{root}/{s.rel}" for s in plan.val], filesystem=fs, decoder=None,
                                  fileselect=_select_member, num_cpus=decode_num_cpus)
    return ds.map_batches(DecodeBatch(plan.members, max_boxes), batch_size=batch_size, batch_format="numpy",
                          num_cpus=decode_num_cpus)


def to_torch(batch: dict[str, np.ndarray], device: torch.device | str = "cpu") -> dict[str, Any]:
    """A decoded numpy batch -> the objective's batch (tensors on ``device``, lists of str)."""
    out: dict[str, Any] = {}
    for name, value in batch.items():
        if name in ("key", "caption_high", "caption_low"):
            out[name] = [str(v) for v in value]
        elif name == "phrases":
            out[name] = [[str(p) for p in row if str(p)] for row in value]
        else:
            # a torch-owned copy: aligned like every other tensor, so CPU kernels take the same code path every run
            out[name] = torch.from_numpy(np.ascontiguousarray(value)).clone().to(device, non_blocking=True)
    return out
