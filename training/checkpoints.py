"""Run storage: checkpoints, resume point and the diffusers export under RUN_URI (local or ``s3://``).

Layout::

    RUN_URI/config.yaml                       resolved config of the launch
    RUN_URI/checkpoints/step-NNNNNNNN/        one checkpoint (Ray Train uploads each worker's files here)
        state.json                            step, epoch, epoch_step, world size, batch geometry
        config.yaml                           resolved config
        deepspeed/...                         DeepSpeed per-rank model/optimizer/scheduler state
        ema.safetensors                       EMA of the trainable weights (train.ema)
        ranks/rank-R.json                     one per rank, written after the rank's upload: complete when all exist
    RUN_URI/export/                           controlnet/ + spasem_export.json (the base models it runs on),
                                              README.md (model card), config.yaml, export.json; with
                                              train.export_full the whole pipeline (model_index.json) too

The resume point is "the newest complete checkpoint"; the dataset factory (on the controller) and
every worker apply the same rule to the same files, so model state and data position always agree.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from spasem.config import StorageConfig
from spasem.storage import LocalStore, Store, download_tree, upload_tree

log = logging.getLogger(__name__)
CHECKPOINTS = "checkpoints"
EXPORT = "export"
_STEP_DIR = re.compile(r"step-(\d{8})")


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


@dataclass(frozen=True)
class TrainState:
    """Where training stands: counters a resumed run continues from."""

    step: int = 0          # optimizer steps done
    epoch: int = 0         # current epoch
    epoch_step: int = 0    # optimizer steps done within the current epoch
    world_size: int = 0
    batch_size: int = 0
    grad_accum: int = 0

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=1, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> TrainState:
        return cls(**json.loads(data))


def resume_point(state: TrainState | None, world: int, batch_size: int, grad_accum: int,
                 steps_per_epoch: Callable[[int], int]) -> TrainState:
    """Normalize a checkpoint's state for this run: a finished epoch rolls over (``steps_per_epoch(epoch)``:
    epochs may differ in length); a changed batch geometry (workers, batch, accumulation) cannot continue
    the epoch's sample order, so the next epoch starts."""
    geometry = dict(world_size=world, batch_size=batch_size, grad_accum=grad_accum)
    if state is None:
        return TrainState(**geometry)
    epoch, epoch_step = state.epoch, state.epoch_step
    same = (state.world_size, state.batch_size, state.grad_accum) == (world, batch_size, grad_accum)
    if not same and epoch_step:
        log.warning("batch geometry changed since the checkpoint (%s -> %s): starting epoch %d afresh",
                    (state.world_size, state.batch_size, state.grad_accum), (world, batch_size, grad_accum), epoch + 1)
        epoch, epoch_step = epoch + 1, 0
    while epoch_step and epoch_step >= steps_per_epoch(epoch):
        epoch, epoch_step = epoch + 1, epoch_step - steps_per_epoch(epoch)
    return TrainState(state.step, epoch, epoch_step, **geometry)


def latest_checkpoint(run: Store) -> tuple[str, TrainState] | None:
    """The newest checkpoint whose every rank finished writing, with its state; None on a fresh run."""
    files = set(run.child(CHECKPOINTS).list())
    best = None
    for rel in files:
        m = re.fullmatch(r"(step-\d{8})/state\.json", rel)
        if not m:
            continue
        name = m.group(1)
        state = TrainState.from_json(run.child(CHECKPOINTS).read(rel))
        if all(f"{name}/ranks/rank-{r}.json" in files for r in range(state.world_size)):
            if best is None or state.step > best[1].step:
                best = (name, state)
    return best


def mark_rank_done(run: Store, name: str, rank: int, step: int) -> None:
    """``ranks/rank-R.json`` of checkpoint ``name``, written only after Ray Train's upload of this rank's
    files returned: a rank killed mid-upload (another rank failed meanwhile) leaves no marker, so its
    partial checkpoint is never taken for a complete one."""
    run.write(f"{CHECKPOINTS}/{name}/ranks/rank-{rank}.json", json.dumps({"rank": rank, "step": step}).encode())


def fetch_checkpoint(run: Store, name: str, rank: int) -> tuple[str, bool]:
    """A local folder holding checkpoint ``name``; ``True`` when it is a temporary copy to delete.

    A local run folder is read in place. From S3 a rank downloads the shared files and its own
    DeepSpeed shards only, never the other ranks' optimizer state.
    """
    store = run.child(f"{CHECKPOINTS}/{name}")
    if isinstance(store, LocalStore):
        return str(store.root), False
    local = tempfile.mkdtemp(prefix=f"ckpt-{name}-")

    def mine(rel: str) -> bool:
        other_rank = re.match(r"zero_pp_rank_(\d+)_", rel.rsplit("/", 1)[-1])
        return not other_rank or int(other_rank.group(1)) == rank

    download_tree(store, local, keep=mine)
    return local, True


def ray_storage(run_uri: str, storage: StorageConfig):
    """``(storage_path, storage_filesystem)`` for RunConfig: Ray Train writes checkpoints under RUN_URI."""
    fs, path = storage.arrow(run_uri)
    return (path if fs is not None else os.path.abspath(os.path.expanduser(path))), fs


def publish_export(local: str | Path, run: Store, config_yaml: str, step: int, card: str = "") -> str:
    """Publish an export folder (``Runner.export``) as RUN_URI/export/ (with the resolved config and the model card
    ``card`` as README.md); returns its URL.

    Locally the new folder replaces the old one by rename, so a reader never sees a half export. On S3
    the files are PUT one by one and ``export/export.json`` (the step) is written last.
    """
    local = Path(local)
    (local / "config.yaml").write_text(config_yaml)
    if card:
        (local / "README.md").write_text(card)
    (local / "export.json").write_text(json.dumps({"step": step}))
    target = run.child(EXPORT)
    if isinstance(target, LocalStore):
        root = target.root
        root.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".export-", dir=root.parent))
        shutil.copytree(local, staging, dirs_exist_ok=True)
        old = root.parent / f".export-old-{os.getpid()}"
        if root.exists():
            os.replace(root, old)
        os.replace(staging, root)
        shutil.rmtree(old, ignore_errors=True)
    else:
        upload_tree(local, target, last="export.json")
    return run.url(EXPORT)

