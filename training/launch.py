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
import sys
from collections.abc import Sequence
from typing import Any

from spasem.config import Config, ConfigError, build_parser, config_to_yaml, parse_cli
from stages.runtime import init_ray
from training.checkpoints import ray_storage
from training.data import DataError, training_shards
from training.loop import LaunchSpec, build_datasets, train_loop_per_worker

log = logging.getLogger("training.launch")
DEFAULT_INPUT = "runs/demo"
DEFAULT_OUTPUT = "runs/train"
FAULT_ENV = "PIPELINE_FAULT_AT_STEP"


def fault_at_step() -> int | None:
    """The test-only fault hook: ``PIPELINE_FAULT_AT_STEP=N`` makes one worker raise once at step N."""
    value = os.environ.get(FAULT_ENV)
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"{FAULT_ENV} must be a step number, got {value!r}") from None


def build_trainer(cfg: Config, spec: LaunchSpec):
    """The TorchTrainer: scaling, storage under RUN_URI, failure policy and per-worker datasets."""
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    t = cfg.train
    storage_path, filesystem = ray_storage(cfg.output, cfg.storage)
    resources = {"CPU": t.cpus_per_worker, **t.resources}
    run_config = RunConfig(
        name="checkpoints", storage_path=storage_path, storage_filesystem=filesystem,
        failure_config=FailureConfig(max_failures=t.max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints),
    )
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"spec": spec},
        torch_config=TorchConfig(backend="nccl" if t.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu, resources_per_worker=resources),
        run_config=run_config,
        datasets=build_datasets(spec),
        # one unsplit dataset per worker, in order: see training/data.py for why not streaming_split
        dataset_config=DataConfig(datasets_to_split=[], execution_options=ExecutionOptions(preserve_order=True)),
    )


def run_training(cfg: Config) -> dict[str, Any]:
    """Plan the shards, write RUN_URI/config.yaml, train; returns a summary of the run."""
    plan = training_shards(cfg.input, cfg.train.val_shards, cfg.storage)
    t = cfg.train
    per_epoch = plan.steps_per_epoch(t.num_workers, t.batch_size * t.grad_accum)
    log.info("%d training shards (%d samples), %d held out; %d steps per epoch; members: %s",
             len(plan.shards), sum(s.count for s in plan.shards), len(plan.val), per_epoch,
             ", ".join(plan.members) or "images only (the rest is computed online)")
    from spasem.profiles import announce_tiny, check_shard_models, prepared_from, resolve_models

    check_shard_models(cfg.storage.open(cfg.input), cfg.models)  # shards annotated by other models: refused
    announce_tiny(cfg.models, prepared_from(cfg.input, cfg.storage), "training.launch")
    paths = resolve_models(cfg.models, ("sd", "clip_vision", "dinov2"))  # the frozen models training loads
    run = cfg.storage.open(cfg.output)
    run.write("config.yaml", config_to_yaml(cfg).encode())
    init_ray(cfg.ray, progress=False)
    spec = LaunchSpec(cfg.model_dump(mode="json"), plan, paths, cfg.model.max_boxes, fault_at_step())
    result = build_trainer(cfg, spec).fit()
    if result.error is not None:
        raise result.error
    return {"output": run.url(""), "steps_per_epoch": per_epoch, "export": run.url("export"),
            "checkpoint": result.checkpoint.path if result.checkpoint else None}


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
    except (DataError, FileNotFoundError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"trained to step {cfg.train.max_steps}: {summary['output']}  export: {summary['export']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
