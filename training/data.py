"""Training data: WebDataset shards -> Ray Data (read, shuffle, decode, batch) -> one stream per worker.

Order is a pure function of ``(train.seed, epoch, rank)`` and the shard listing, so epochs differ
and a resumed run continues exactly where the last checkpoint stopped:

- each epoch permutes the shards (seed, epoch); worker ``r`` of ``W`` takes every W-th shard of that
  permutation, so it reads only its own bytes;
- inside a worker's stream, each window of ``train.shuffle_window`` consecutive shards is a shuffle
  buffer: its samples are permuted by (seed, epoch, rank, window), so the crops one photo left next to
  each other in a shard land in different batches;
- one epoch is ``steps_per_epoch(epoch)`` optimizer steps, the same on every worker (the smallest
  stream of that epoch sets it; the tail of longer streams is left out of that epoch only).

The order is planned from the listing's keys, never drawn from Ray's random shuffles, so a
checkpoint's ``(epoch, epoch_step)`` names the exact next sample: on resume a worker's stream starts
at that position, its consumed keys dropped before decoding. The whole rest of the run (all remaining
epochs) is one dataset per worker.

Ray's ``streaming_split`` hands blocks to whichever worker asks first, which makes the sample->step
mapping depend on timing; exact resume needs a deterministic mapping, hence one unsplit dataset per
worker, each still reaching its worker through ``ray.train.get_dataset_shard``.
Only ``.png``, ``.json`` and ``.npy`` members are decoded (``np.load(allow_pickle=False)``), never pickle.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from spasem.columns import stable_seed
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
# members a sample may lack although the first shard has them: the HR's quality caption's states, absent
# from samples annotated before annotate.captions.low_hr (has_low_hr says which samples have them)
OPTIONAL_MEMBERS = ("text_low_hr.npy",)
WANTED = IMAGE_MEMBERS + ("json", "caption.json", "boxes.json") + TENSOR_MEMBERS


class DataError(ValueError):
    """Shards that cannot feed the configured training run."""


@dataclass(frozen=True)
class Window:
    """One shuffle window of a worker's epoch: the shards it reads and its keys in training order."""

    shards: tuple[ShardInfo, ...]
    keys: tuple[str, ...]


@dataclass(frozen=True)
class ShardPlan:
    """The training shards, the optional members they carry, where they live, and the order rule."""

    root: str
    shards: tuple[ShardInfo, ...]
    members: tuple[str, ...]
    val: tuple[ShardInfo, ...] = field(default=())
    seed: int = 0
    window: int = 1  # shards per shuffle window

    def rank_shards(self, rank: int, world: int, epoch: int) -> tuple[ShardInfo, ...]:
        """Worker ``rank``'s shards in epoch ``epoch``: every ``world``-th of the epoch's permutation."""
        order = np.random.default_rng(stable_seed(self.seed, "shards", epoch)).permutation(len(self.shards))
        return tuple(self.shards[i] for i in order[rank::world])

    def steps_per_epoch(self, world: int, rows_per_step: int, epoch: int = 0) -> int:
        """Optimizer steps of ``epoch``: every worker must fill each step, so the smallest stream decides."""
        if len(self.shards) < world:
            raise DataError(f"{len(self.shards)} training shards for {world} workers: each worker needs at least "
                            f"one shard; lower train.num_workers or write smaller shards (data.shard_size)")
        rows = min(sum(s.count for s in self.rank_shards(r, world, epoch)) for r in range(world))
        steps = rows // rows_per_step
        if steps == 0:
            raise DataError(f"the smallest worker stream of epoch {epoch} has {rows} samples, fewer than one step "
                            f"(batch_size x grad_accum = {rows_per_step}); lower train.batch_size")
        return steps

    def windows(self, rank: int, world: int, epoch: int, rows: int) -> list[Window]:
        """Worker ``rank``'s epoch as shuffle windows, cut after ``rows`` samples (the epoch's length)."""
        shards = self.rank_shards(rank, world, epoch)
        out: list[Window] = []
        for index, start in enumerate(range(0, len(shards), self.window)):
            if rows <= 0:
                break
            group = shards[start:start + self.window]
            keys = [k for s in group for k in s.keys]
            rng = np.random.default_rng(stable_seed(self.seed, "window", epoch, rank, index))
            keys = [keys[i] for i in rng.permutation(len(keys))][:rows]
            rows -= len(keys)
            out.append(Window(group, tuple(keys)))
        return out


def training_shards(uri: str, val_shards: int = 0, storage: StorageConfig | None = None, seed: int = 0,
                    shuffle_window: int = 1) -> ShardPlan:
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
    return ShardPlan(folder.uri, tuple(train), members, tuple(val), seed, shuffle_window)


def _select_member(fname: str) -> bool:
    # read only what training uses: unknown members (and anything pickled) never leave the tar
    return fname.partition(".")[2] in WANTED


def stream_plan(plan: ShardPlan, rank: int, world: int, rows_per_step: int, epoch: int, epoch_step: int,
                num_steps: int) -> list[dict[str, int]]:
    """The read tasks of ``num_steps`` steps from ``(epoch, epoch_step)``: ``{epoch, window, start, stop}``
    each, ``start:stop`` slicing the window's ordered keys (a resumed window starts past its consumed keys)."""
    items: list[dict[str, int]] = []
    while num_steps > 0:
        per_epoch = plan.steps_per_epoch(world, rows_per_step, epoch)
        take = min(per_epoch - epoch_step, num_steps)
        first, end, pos = epoch_step * rows_per_step, (epoch_step + take) * rows_per_step, 0
        for index, window in enumerate(plan.windows(rank, world, epoch, per_epoch * rows_per_step)):
            lo, hi = max(first - pos, 0), min(end - pos, len(window.keys))
            if lo < hi:
                items.append({"epoch": epoch, "window": index, "start": lo, "stop": hi})
            pos += len(window.keys)
        num_steps -= max(take, 0)
        epoch, epoch_step = epoch + 1, 0
    return items


def _read_window(item: dict[str, Any], plan: ShardPlan, rank: int, world: int, rows_per_step: int,
                 storage: StorageConfig, columns: tuple[str, ...]):
    """Ray Data flat_map: one window's samples, raw members, in the planned order."""
    epoch, index = int(item["epoch"]), int(item["window"])
    per_epoch = plan.steps_per_epoch(world, rows_per_step, epoch)
    window = plan.windows(rank, world, epoch, per_epoch * rows_per_step)[index]
    wanted = window.keys[int(item["start"]):int(item["stop"])]
    need, found = set(wanted), {}
    folder = storage.open(plan.root)
    for shard in window.shards:
        if not need.isdisjoint(shard.keys):
            for key, members in read_tar(folder.read(shard.rel)):
                if key in need:
                    found[key] = {m: v for m, v in members.items() if _select_member(f"x.{m}")}
    for key in wanted:
        members = found.get(key)
        if members is None:
            raise DataError(f"sample {key!r} listed in {[s.rel for s in window.shards]} under {plan.root} is "
                            "missing: the shard changed since the run was planned")
        absent = [c for c in columns if c not in members and c not in OPTIONAL_MEMBERS]
        if absent:
            raise DataError(f"sample {key!r} under {plan.root} lacks {absent}; every training shard must carry "
                            "the members of the first one")
        # a missing optional member travels as b"": Ray turns a block's all-None column into float NaNs
        yield {"__key__": key, **{c: members.get(c, b"") for c in columns}}


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
        rows = [decode_annotations({m: batch[m][i] for m in self.members if len(batch[m][i])}) for i in range(n)]
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
        if "caption.json" in self.members:
            # the HR's quality caption (annotate.captions.low_hr), in every batch of captioned shards so that
            # every batch has the same columns: "" and has_low_hr False where a sample has none (annotated
            # before low_hr, e.g. in a prepare resumed across the change)
            out["caption_low_hr"] = np.asarray([r.get("caption_low_hr", "") for r in rows], dtype=object)
            out["has_low_hr"] = np.asarray(["caption_low_hr" in r for r in rows])
        for member in self.members:
            if member.endswith(".npy"):
                name = member[:-4]
                out[name] = _low_hr_states(rows) if name == "text_low_hr" else np.stack([r[name] for r in rows])
        return out


def _low_hr_states(rows: list[dict[str, Any]]) -> np.ndarray:
    """``text_low_hr`` of a batch, zeros where a sample has none (``has_low_hr`` says which)."""
    like = next((r["text_low_hr"] for r in rows if "text_low_hr" in r), None)
    if like is None:
        like = next((r["text"][1] for r in rows if "text" in r), None)
    if like is None:
        raise DataError("shards list text_low_hr.npy members but these samples have neither it nor text.npy")
    return np.stack([r.get("text_low_hr", np.zeros_like(like)) for r in rows])


def rank_dataset(plan: ShardPlan, rank: int, world: int, batch_size: int, grad_accum: int, epoch: int,
                 epoch_step: int, num_steps: int, max_boxes: int, storage: StorageConfig | None = None,
                 decode_num_cpus: float = 0.25):
    """Worker ``rank``'s stream of ``num_steps`` steps from ``(epoch, epoch_step)``, across epoch boundaries."""
    import ray

    rows_per_step = batch_size * grad_accum
    if num_steps <= 0:
        raise DataError(f"worker {rank} has no steps left to read ({num_steps})")
    items = stream_plan(plan, rank, world, rows_per_step, epoch, epoch_step, num_steps)
    read = functools.partial(_read_window, plan=plan, rank=rank, world=world, rows_per_step=rows_per_step,
                             storage=storage or StorageConfig(), columns=IMAGE_MEMBERS + plan.members)
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.flat_map(read, num_cpus=decode_num_cpus)
    ds = ds.map_batches(DecodeBatch(plan.members, max_boxes), batch_size=batch_size, batch_format="numpy",
                        num_cpus=decode_num_cpus)
    ds.context.execution_options.preserve_order = True  # the planned order is the point
    return ds


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
        if name in ("key", "caption_high", "caption_low", "caption_low_hr"):
            out[name] = [str(v) for v in value]
        elif name == "phrases":
            out[name] = [[str(p) for p in row if str(p)] for row in value]
        else:
            # a torch-owned copy: aligned like every other tensor, so CPU kernels take the same code path every run
            out[name] = torch.from_numpy(np.ascontiguousarray(value)).clone().to(device, non_blocking=True)
    return out
