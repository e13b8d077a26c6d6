"""``train_loop_per_worker`` and the per-worker dataset factory that Ray Train calls.

The loop is thin: build the runner, resume from the newest complete checkpoint, then feed it
``grad_accum`` batches per step from this worker's stream (the rest of the run, every remaining epoch
in its seeded order), logging on rank 0, reporting metrics to Ray Train (``Result.metrics`` and any
Ray integration) and checkpointing every ``train.checkpoint_every`` steps. The dataset factory runs on
Ray Train's controller each time a worker group starts (first launch and every restart after a
failure), so the streams always start at the checkpoint the workers load.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from spasem.config import Config, config_to_yaml, validate_config
from spasem.model.sr_pipeline import load_sr_pipeline
from spasem.profiles import NodePaths
from training.checkpoints import (
    TrainState,
    checkpoint_name,
    fetch_checkpoint,
    latest_checkpoint,
    mark_rank_done,
    publish_export,
    resume_point,
)
from training.data import ShardPlan, rank_dataset, to_torch, val_dataset
from training.model_card import model_card

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LaunchSpec:
    """Everything a worker needs besides the config; plain data, shipped by Ray to every worker."""

    config: dict[str, Any]        # the resolved config (model_dump)
    plan: ShardPlan
    paths: NodePaths              # the frozen models, resolved by each worker on its own node
    max_boxes: int

    @property
    def cfg(self) -> Config:
        return validate_config(self.config)


def _start_state(spec: LaunchSpec, world: int) -> tuple[TrainState, str | None]:
    cfg = spec.cfg
    t = cfg.train
    found = latest_checkpoint(cfg.storage.open(cfg.output))
    state = resume_point(found[1] if found else None, world, t.batch_size, t.grad_accum,
                         lambda epoch: spec.plan.steps_per_epoch(world, t.batch_size * t.grad_accum, epoch))
    return state, (found[0] if found else None)


def build_datasets(spec: LaunchSpec) -> dict[str, Any]:
    """Dataset factories by name: ``train-R`` (worker R, from the checkpoint to ``train.max_steps``), ``val``."""
    cfg = spec.cfg
    t, world = cfg.train, cfg.train.num_workers
    common = dict(max_boxes=spec.max_boxes, decode_num_cpus=t.decode_num_cpus, storage=cfg.storage)

    def stream(rank: int):
        state, _ = _start_state(spec, world)
        todo = max(t.max_steps - state.step, 1)  # a finished run still needs a (never read) stream
        return rank_dataset(spec.plan, rank, world, t.batch_size, t.grad_accum, state.epoch, state.epoch_step,
                            todo, **common)

    out: dict[str, Any] = {f"train-{rank}": lambda rank=rank: stream(rank) for rank in range(world)}
    if spec.plan.val:
        out["val"] = lambda: val_dataset(spec.plan, batch_size=t.batch_size, **common)
    return out


def _batches(iterator, cfg: Config, device):
    for batch in iterator.iter_batches(batch_size=cfg.train.batch_size, batch_format="numpy",
                                       prefetch_batches=cfg.train.prefetch_batches, drop_last=True):
        yield to_torch(batch, device)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry (``config = {"spec": LaunchSpec}``): resume, train to ``train.max_steps``, checkpoint."""
    spec: LaunchSpec = config["spec"]
    import ray.train
    import ray.train.torch

    cfg = spec.cfg
    t = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    from training.runner import Runner, set_accelerator

    set_accelerator(t.use_gpu)
    device = ray.train.torch.get_device()
    run = cfg.storage.open(cfg.output)
    runner = Runner(cfg, spec.paths, rank, world, device)
    start, found = _start_state(spec, world)
    if found:
        local, temporary = fetch_checkpoint(run, found, rank)
        runner.load_checkpoint(local)
        if temporary:
            shutil.rmtree(local, ignore_errors=True)
        if rank == 0:
            log.info("resumed from %s at step %d (epoch %d, step %d of the epoch)", found, start.step,
                     start.epoch, start.epoch_step)
    runner.state = start
    rows_per_step = t.batch_size * t.grad_accum
    per_epoch = spec.plan.steps_per_epoch(world, rows_per_step, start.epoch)
    reporter = None
    if rank == 0:
        from training.reporting import RunLog

        reporter = RunLog(run, start.step)
    val = [to_torch(b, device) for b in spec_val_batches(spec, cfg)] if spec.plan.val else []
    samples_batch = None
    seen_since_log, wait_since_log, t_log = 0, 0.0, time.perf_counter()
    paused = 0.0  # checkpoint, export and validation seconds since the last log: not training time

    def report(metrics: dict[str, float], with_checkpoint: bool, final: bool) -> None:
        """Every rank reports at the same steps (Ray Train's rule); rank 0's metrics reach Result.metrics."""
        folder = None
        if with_checkpoint:
            folder = tempfile.mkdtemp(prefix="ckpt-")
            runner.save_checkpoint(folder)
            if t.export_with_checkpoint or final:
                export_and_sample(publish=True)
            if reporter is not None:
                reporter.sync()
        name = checkpoint_name(runner.state.step)
        ray.train.report({"step": runner.state.step, **metrics},
                         checkpoint=ray.train.Checkpoint.from_directory(folder) if folder else None,
                         checkpoint_dir_name=name if folder else None)  # returns once this rank's files are up
        if folder:
            mark_rank_done(run, name, rank, runner.state.step)
            shutil.rmtree(folder, ignore_errors=True)

    def export_and_sample(publish: bool) -> None:
        exported = runner.export()  # collective under ZeRO-3
        if rank == 0:
            if publish:
                card = model_card(cfg, runner.state.step, runner.state.epoch, _data_line(spec))
                publish_export(exported, run, config_to_yaml(cfg), runner.state.step, card)
            _samples(exported, samples_batch, runner.state.step, cfg, spec.paths.cfg, run, reporter, device)
            shutil.rmtree(exported, ignore_errors=True)

    if val and start.step == 0:
        scores = runner.validate(val)  # every rank: ZeRO-3 gathers parameters collectively
        if reporter is not None:
            reporter.log(0, scores)
    micro: list[dict[str, Any]] = []
    t_wait = time.perf_counter()
    for batch in _batches(ray.train.get_dataset_shard(f"train-{rank}"), cfg, device):
        if runner.state.step >= t.max_steps:
            break
        micro.append(batch)
        if len(micro) < t.grad_accum:
            continue
        wait_since_log += time.perf_counter() - t_wait
        if samples_batch is None and rank == 0:
            samples_batch = micro[0]
        metrics = runner.train_step(micro)
        micro = []
        seen_since_log += rows_per_step * world
        step = runner.state.step
        last = step >= t.max_steps
        due_ckpt = step % t.checkpoint_every == 0 or last
        due_val = bool(val) and (due_ckpt or (t.validate_every and step % t.validate_every == 0))
        if due_val:
            t_pause = time.perf_counter()
            metrics.update(runner.validate(val))
            paused += time.perf_counter() - t_pause
        due_log = step % t.log_every == 0 or last or due_val
        if due_log:
            elapsed = time.perf_counter() - t_log - paused
            metrics.update(samples_per_s=seen_since_log / elapsed, data_wait_share=wait_since_log / elapsed,
                           epoch=runner.state.epoch, **_peak_memory(device))
            if reporter is not None:
                reporter.log(step, metrics)
            seen_since_log, wait_since_log, t_log, paused = 0, 0.0, time.perf_counter(), 0.0
        t_pause = time.perf_counter()
        if due_ckpt or due_log:
            report(metrics if due_log else {}, with_checkpoint=due_ckpt, final=last)
        if not due_ckpt and t.sample_every and step % t.sample_every == 0:
            export_and_sample(publish=False)
        paused += time.perf_counter() - t_pause
        if runner.state.epoch_step >= per_epoch:  # the stream runs on into the next epoch's planned order
            runner.next_epoch()
            per_epoch = spec.plan.steps_per_epoch(world, rows_per_step, runner.state.epoch)
        t_wait = time.perf_counter()
    if reporter is not None:
        reporter.close()
    _shutdown()


def _data_line(spec: LaunchSpec) -> str:
    plan = spec.plan
    return (f"{sum(s.count for s in plan.shards)} samples in {len(plan.shards)} WebDataset shards under "
            f"`{plan.root}` ({len(plan.val)} more held out for validation); members read from the shards: "
            f"{', '.join(plan.members) or 'images only (captions, features and latents computed online)'}.")


def spec_val_batches(spec: LaunchSpec, cfg: Config):
    import ray.train

    return ray.train.get_dataset_shard("val").iter_batches(batch_size=cfg.train.batch_size, batch_format="numpy")


def _samples(export_dir: str, batch: dict[str, Any] | None, step: int, cfg: Config, models, run, reporter,
             device) -> None:
    """Rank 0: LR | output | HR grid from the freshly exported pipeline (so the export is exercised too)."""
    if batch is None:
        return
    from training.reporting import render_samples, write_png

    try:
        pipe = load_sr_pipeline(export_dir, str(device), models=models)  # base models: this node's
        grid = render_samples(pipe, batch, cfg.train.num_samples, cfg.train.sample_steps, cfg.train.seed)
    except Exception:  # a broken grid must not kill a long run; the export itself was already published
        log.exception("sample grid at step %d failed", step)
        return
    url = write_png(run, f"samples/step-{step:08d}.png", grid)
    if reporter is not None:
        reporter.add_image("samples", grid, step)
    log.info("sample grid: %s", url)


def _peak_memory(device) -> dict[str, float]:
    """This process's peak host RSS and, on GPU, peak allocated device memory, in MiB."""
    import resource

    import torch

    out = {"peak_host_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if getattr(device, "type", "cpu") == "cuda":
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def _shutdown() -> None:
    """End cleanly: torch + gloo can abort at exit unless every rank meets once more."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
