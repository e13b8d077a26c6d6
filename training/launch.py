"""``python -m training.launch``: train the Spatial-Semantic ControlNet from prepared shards.

Ray Train's ``TorchTrainer`` runs ``train.num_workers`` workers (GPU or CPU + gloo), each a DeepSpeed
ZeRO engine fed by its own Ray Data stream of the shards. Checkpoints, metrics, TensorBoard logs,
sample grids and the diffusers export go under ``--output`` (local or ``s3://``); relaunching with the
same ``--output`` resumes from the newest complete checkpoint with the same step counter.

Defaults: ``--input runs/demo`` (what ``make demo`` prepares; its ``shards/`` folder is used, or the
folder itself when it holds the tars), ``--output runs/train``, the tiny profile.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Sequence
from typing import Any

from spasem.config import Config, ConfigError, build_parser, parse_cli
from stages.runtime import error_line, init_ray, user_errors
from training.checkpoints import latest_checkpoint, ray_storage
from training.data import DataError, training_shards
from training.loop import LaunchSpec, build_datasets, train_loop_per_worker

log = logging.getLogger("training.launch")
DEFAULT_INPUT = "runs/demo"
DEFAULT_OUTPUT = "runs/train"


def _missing_model(name: str, path: str) -> str | None:
    """Why model ``path`` cannot load in the workers, or None: checked here, where no retry hides it."""
    if os.path.isdir(os.path.expanduser(path)):
        return None
    if "://" in path or path.startswith(("/", ".", "~")) or path.count("/") != 1:
        return f"models.{name}={path!r} is not a folder: point it at a model folder or a Hugging Face hub id"
    from huggingface_hub import constants, try_to_load_from_cache

    marker = "model_index.json" if name == "sd" else "config.json"
    if constants.HF_HUB_OFFLINE and not isinstance(try_to_load_from_cache(path, marker), str):
        return (f"models.{name}={path!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set: "
                f"download it first (huggingface-cli download {path}) or unset HF_HUB_OFFLINE")
    return None


def preflight(cfg: Config, plan, run) -> int | None:
    """Errors no restart can fix, raised before any worker starts (one line each); returns the step of the
    checkpoint this launch resumes, if any. Also refuses config changes that would break it."""
    from training.relaunch import check_relaunch
    from training.runner import load_objective_class

    t = cfg.train
    load_objective_class(t.objective)
    if t.ema and cfg.deepspeed.stage == 3:
        raise ConfigError("train.ema needs whole parameters on every rank: use deepspeed.stage 1 or 2 with EMA")
    found = latest_checkpoint(run)
    if found and cfg.deepspeed.stage == 3 and found[1].world_size != t.num_workers:
        raise ConfigError(
            f"checkpoint {found[0]} was written by {found[1].world_size} workers and ZeRO-3 partitions the "
            f"weights themselves across them: relaunch with train.num_workers={found[1].world_size}")
    check_relaunch(run, cfg, plan.members, found[1].step if found else None)
    return found[1].step if found else None


def build_trainer(cfg: Config, spec: LaunchSpec):
    """The TorchTrainer: scaling, storage under RUN_URI, failure policy and per-worker datasets."""
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig

    from training.failures import trainer_class

    t = cfg.train
    storage_path, filesystem = ray_storage(cfg.output, cfg.storage)
    resources = {"CPU": t.cpus_per_worker, **t.resources}
    run_config = RunConfig(
        name="checkpoints", storage_path=storage_path, storage_filesystem=filesystem,
        failure_config=FailureConfig(max_failures=t.max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints),
    )
    return trainer_class()(
        train_loop_per_worker,
        train_loop_config={"spec": spec},
        torch_config=TorchConfig(backend="nccl" if t.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu, resources_per_worker=resources),
        run_config=run_config,
        datasets=build_datasets(spec),
        # one unsplit dataset per worker, in order: see training/data.py for why not streaming_split
        dataset_config=DataConfig(datasets_to_split=[], execution_options=ExecutionOptions(preserve_order=True)),
    )


class TrainingFailed(RuntimeError):
    """The workers failed ``train.max_failures + 1`` times; the cause is in the message."""


def _last_line(error: BaseException) -> str:
    """The worker's own exception as one line: Ray's error text ends with the worker traceback's last line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    causes = [line for line in lines if re.match(r"^[A-Za-z_.]*(Error|Exception|Mismatch)\b", line)]
    return causes[-1] if causes else f"{type(error).__name__}: {lines[0] if lines else ''}"


def run_training(cfg: Config) -> dict[str, Any]:
    """Plan the shards, check what no restart can fix, record the launch, train; returns a summary."""
    t = cfg.train
    plan = training_shards(cfg.input, t.val_shards, cfg.storage, seed=t.seed, shuffle_window=t.shuffle_window)
    per_epoch = plan.steps_per_epoch(t.num_workers, t.batch_size * t.grad_accum)
    log.info("%d training shards (%d samples), %d held out; %d steps in epoch 0; members: %s",
             len(plan.shards), sum(s.count for s in plan.shards), len(plan.val), per_epoch,
             ", ".join(plan.members) or "images only (the rest is computed online)")
    from spasem.profiles import NodePaths, announce_tiny, check_shard_models, prepared_from

    # shards annotated by other models are refused (the markers were read once, by training_shards)
    check_shard_models(cfg.storage.open(plan.root), cfg.models, plan.shards + plan.val)
    announce_tiny(cfg.models, prepared_from(cfg.input, cfg.storage), "training.launch")
    # the frozen models training loads: each worker resolves (tiny: builds) them on its own node
    paths = NodePaths(cfg.models, ("sd", "clip_vision", "dinov2"))
    for name, path in paths.declared().items():
        problem = _missing_model(name, path)
        if problem:
            raise ConfigError(problem)
    run = cfg.storage.open(cfg.output)
    preflight(cfg, plan, run)
    init_ray(cfg.ray, progress=False)
    spec = LaunchSpec(cfg.model_dump(mode="json"), plan, paths, cfg.model.max_boxes)
    try:
        result = build_trainer(cfg, spec).fit()
        error = result.error
    except Exception as exc:  # Ray Train raises the workers' failure from fit() once retries are spent
        result, error = None, exc
    if error is not None:
        log.error("training failed", exc_info=error)
        from training.failures import deterministic_cause

        cause = deterministic_cause(error)
        if cause is not None:
            raise TrainingFailed(f"training stopped without a restart (every restart would fail the same way): "
                                 f"{type(cause).__name__}: {cause}") from error
        raise TrainingFailed(f"training failed after {t.max_failures} restart(s): {_last_line(error)} "
                             "(the full traceback is logged above)") from error
    return {"output": run.url(""), "steps_per_epoch": per_epoch, "export": run.url("export"),
            "checkpoint": result.checkpoint.path if result.checkpoint else None, "metrics": dict(result.metrics or {})}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser(
        "python -m training.launch",
        "Train the Spatial-Semantic ControlNet with Ray Train + DeepSpeed from WebDataset shards; checkpoints, "
        "metrics, samples and the diffusers export go under OUTPUT (local or s3://). Relaunch to resume.",
        ["train", "deepspeed", "models"],
    )
    _, cfg = parse_cli(parser, argv, DEFAULT_INPUT, DEFAULT_OUTPUT)
    try:
        summary = run_training(cfg)
    except (*user_errors(), DataError, TrainingFailed) as exc:
        print(error_line(exc), file=sys.stderr)
        return 1
    print(f"trained to step {cfg.train.max_steps}: {summary['output']}  export: {summary['export']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
