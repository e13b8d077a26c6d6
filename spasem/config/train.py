"""Config sections for training: ``train`` (the loop, data, logging, fault tolerance) and ``deepspeed``.

`spasem.config` composes them into the one tree. The DeepSpeed JSON is never written by hand: it
is built from ``deepspeed`` and ``train`` by `training.deepspeed_config.build_deepspeed_config`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TrainConfig(_Section):
    # scaling
    num_workers: int = Field(2, ge=1, description="Ray Train workers (one process per GPU, or per CPU slot)")
    use_gpu: bool = Field(False, description="one GPU per worker; false: CPU workers with gloo")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per training worker (fractional on small machines)")
    resources: dict[str, float] = Field(default_factory=dict,
                                        description="extra Ray resources per worker, e.g. {train_node: 1} (cluster.yaml)")
    # optimization (XPSR: AdamW, lr 5e-5, weight decay 1e-2)
    batch_size: int = Field(4, ge=1, description="samples per worker per micro-step")
    grad_accum: int = Field(1, ge=1, description="micro-steps per optimizer step")
    max_steps: int = Field(1000, ge=1, description="optimizer steps of the whole run (a resumed run stops here too)")
    lr: float = Field(5e-5, gt=0, description="AdamW learning rate")
    weight_decay: float = Field(1e-2, ge=0, description="AdamW weight decay")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas")
    warmup_steps: int = Field(0, ge=0, description="linear learning-rate warm-up, in optimizer steps")
    grad_clip: float = Field(1.0, ge=0, description="gradient norm clipping (0: off)")
    ema: bool = Field(False, description="keep an EMA of the trainable weights; the export uses it")
    ema_decay: float = Field(0.999, gt=0, lt=1, description="EMA decay per optimizer step")
    seed: int = Field(0, description="seeds the sample order per (epoch, rank) and noise, timesteps and stream "
                      "dropout per (step, rank): resume-exact")
    # checkpoints and export
    checkpoint_every: int = Field(500, ge=1, description="optimizer steps between checkpoints (and one at the end)")
    keep_checkpoints: int = Field(3, ge=1, description="checkpoints kept under RUN_URI/checkpoints")
    export_with_checkpoint: bool = Field(True, description="refresh RUN_URI/export/ at every checkpoint (always at the end)")
    export_full: bool = Field(False, description="the export also holds the frozen base models (model_index.json "
                              "folder, loads with no base model around); default: the trained ControlNet and a "
                              "reference to models.sd/clip_vision/dinov2")
    max_failures: int = Field(3, ge=0, description="worker-group restarts from the last checkpoint before giving up")
    # logging
    log_every: int = Field(10, ge=1, description="steps between metrics.jsonl / TensorBoard lines")
    sample_every: int = Field(0, ge=0, description="steps between LR|output|HR sample grids (0: only at the end)")
    sample_steps: int = Field(10, ge=1, description="denoising steps of the sample grids")
    num_samples: int = Field(2, ge=1, description="rows of each sample grid")
    validate_every: int = Field(0, ge=0, description="steps between validations on the held-out shards (0: at checkpoints)")
    val_shards: int = Field(0, ge=0, description="last N shards held out for validation (0: no validation)")
    # data loading
    shuffle_window: int = Field(2, ge=1, description="shards whose samples are shuffled together in a worker's "
                                "stream (a shuffle buffer held in memory as raw bytes); the shard order is "
                                "permuted every epoch too, both seeded by (train.seed, epoch, rank)")
    prefetch_batches: int = Field(2, ge=0, description="batches Ray Data prepares ahead of each worker")
    decode_num_cpus: float = Field(0.25, gt=0, description="CPUs per Ray Data decode task")
    objective: str = Field("training.objective:SRObjective",
                           description="module:Class with from_paths(paths, model_cfg, loss_cfg, dtype)")

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.warmup_steps >= self.max_steps > 1 and self.warmup_steps:
            raise ValueError(f"train.warmup_steps={self.warmup_steps} must be below train.max_steps={self.max_steps}")
        if ":" not in self.objective:
            raise ValueError(f"train.objective={self.objective!r} must be 'module:Class'")
        return self


class DeepSpeedConfig(_Section):
    stage: Literal[1, 2, 3] = Field(2, description="ZeRO stage: 1 optimizer, 2 + gradients, 3 + parameters sharded")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="fp32 or bf16 (mixed, fp32 master weights)")
    offload_optimizer: bool = Field(False, description="keep optimizer state (and its step) on the CPU")
    offload_params: bool = Field(False, description="ZeRO-3 only: keep parameters on the CPU")
    bucket_size: int = Field(50_000_000, ge=1, description="reduce / all-gather bucket size in elements")
    overlap_comm: bool | None = Field(None, description="overlap reduction with backward (default: on GPU only)")
    extra: dict[str, Any] = Field(default_factory=dict,
                                  description="merged last into the DeepSpeed config dict (expert escape hatch)")

    @model_validator(mode="after")
    def _check(self) -> DeepSpeedConfig:
        if self.offload_params and self.stage != 3:
            raise ValueError(f"deepspeed.offload_params needs deepspeed.stage=3, got stage={self.stage}")
        return self
