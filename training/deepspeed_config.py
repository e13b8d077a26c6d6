"""The DeepSpeed config dict, built from the typed ``train`` and ``deepspeed`` sections.

Nothing here is hand-written JSON: every value comes from config, so a run's checkpoint (which
stores the resolved config) says exactly how it was trained. The optimizer is a torch AdamW passed
to ``deepspeed.initialize``, not one of DeepSpeed's C++ ops: it works on CPU (gloo, tests, demo)
without compiling anything, and on GPU it is the same maths as FusedAdam.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch

from spasem.config.train import DeepSpeedConfig, TrainConfig


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge ``extra`` into a copy of ``base`` (``deepspeed.extra`` wins)."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def build_deepspeed_config(train: TrainConfig, ds: DeepSpeedConfig, world_size: int) -> dict[str, Any]:
    """DeepSpeed's config dict: batch sizes, ZeRO stage and offload, precision, clipping."""
    overlap = train.use_gpu if ds.overlap_comm is None else ds.overlap_comm
    zero: dict[str, Any] = {
        "stage": ds.stage,
        "overlap_comm": overlap,
        "contiguous_gradients": True,
        "reduce_bucket_size": ds.bucket_size,
        "allgather_bucket_size": ds.bucket_size,
    }
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": train.use_gpu}
    if ds.stage == 3:
        zero.update(stage3_prefetch_bucket_size=ds.bucket_size, stage3_param_persistence_threshold=10_000,
                    stage3_gather_16bit_weights_on_model_save=False)
        if ds.offload_params:
            zero["offload_param"] = {"device": "cpu", "pin_memory": train.use_gpu}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": train.batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "train_batch_size": train.batch_size * train.grad_accum * world_size,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": ds.precision == "bf16"},
        "fp16": {"enabled": False},
        # a torch AdamW is passed in: DeepSpeed must neither replace it nor refuse it
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,  # rank 0 logs through training/reporting.py instead
        "wall_clock_breakdown": False,
        "seed": train.seed,
    }
    if ds.precision == "bf16":
        # accumulate gradients in fp32: bf16 accumulation loses small updates over many micro-steps
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    return _merge(config, ds.extra)


def build_optimizer(params: list[torch.nn.Parameter], train: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters only (XPSR: lr 5e-5, weight decay 1e-2)."""
    if not params:
        raise ValueError("the objective has no trainable parameters: nothing to train")
    return torch.optim.AdamW(params, lr=train.lr, betas=tuple(train.betas), weight_decay=train.weight_decay)


def build_lr_scheduler(optimizer: torch.optim.Optimizer, train: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up to ``train.lr`` then constant (the ControlNet / XPSR schedule)."""
    warmup = train.warmup_steps

    def factor(step: int) -> float:
        return 1.0 if warmup == 0 else min(1.0, (step + 1) / warmup)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def describe(config: dict[str, Any]) -> str:
    """One log line summarizing a DeepSpeed config."""
    zero = config["zero_optimization"]
    precision = "bf16" if config["bf16"]["enabled"] else "fp32"
    offload = "optimizer->cpu" if "offload_optimizer" in zero else "no offload"
    if "offload_param" in zero:
        offload += ", params->cpu"
    return (f"ZeRO-{zero['stage']}, {precision}, {offload}, micro-batch {config['train_micro_batch_size_per_gpu']}"
            f" x accum {config['gradient_accumulation_steps']} -> global batch {config['train_batch_size']}, "
            f"clip {config['gradient_clipping'] if not math.isclose(config['gradient_clipping'], 0) else 'off'}")
