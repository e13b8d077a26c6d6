"""The training runner: one DeepSpeed engine around the objective, with ``train_step``, ``validate``,
``save_checkpoint``, ``load_checkpoint`` and ``export``.

Randomness (noise, timesteps, stream dropout) is drawn from a generator seeded by (seed, step,
micro-step, rank), never from a global RNG that a restart would reset, so a resumed run computes
bit-for-bit the losses an uninterrupted run computes.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import tempfile
from collections.abc import Mapping
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from spasem.columns import stable_seed
from spasem.config import Config, ConfigError, config_to_yaml
from spasem.model.sr_pipeline import write_reference
from training.checkpoints import TrainState
from training.deepspeed_config import build_deepspeed_config, build_lr_scheduler, build_optimizer, describe

log = logging.getLogger(__name__)
DS_TAG = "deepspeed"


def load_objective_class(spec: str) -> type:
    """``module:Class`` -> the class (``train.objective``)."""
    module, _, name = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"train.objective={spec!r} cannot be imported: {exc}") from None


class CheckpointMismatch(ValueError):
    """A checkpoint whose weights do not fit the model built from the config."""


class EMA:
    """Exponential moving average of the trainable weights, in float32, on every rank (ZeRO 1/2)."""

    def __init__(self, named: list[tuple[str, torch.nn.Parameter]], decay: float):
        self.decay = decay
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.shadow = [p.detach().float().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        for s, p in zip(self.shadow, self.params, strict=True):
            s.lerp_(p.detach().float(), 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: s.cpu() for n, s in zip(self.names, self.shadow, strict=True)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for i, name in enumerate(self.names):
            self.shadow[i].copy_(state[name])


class Runner:
    """Owns the engine and the counters; the loop in ``training.loop`` feeds it batches."""

    def __init__(self, cfg: Config, paths: Mapping[str, str], rank: int, world_size: int, device: torch.device):
        import deepspeed

        self.cfg, self.rank, self.world_size, self.device = cfg, rank, world_size, device
        self.stage = cfg.deepspeed.stage
        if cfg.train.ema and self.stage == 3:  # launch refuses this first; the runner is also used on its own
            raise ConfigError("train.ema needs whole parameters on every rank: use deepspeed.stage 1 or 2 with EMA")
        cls = load_objective_class(cfg.train.objective)
        # new layers are initialized from the global RNG: seed it, or two launches of the same config start
        # from different weights (and a relaunch could never be compared with an uninterrupted run)
        torch.manual_seed(stable_seed(cfg.train.seed, "init"))
        objective = cls.from_paths(paths, cfg.model, cfg.loss,
                                   dtype=torch.bfloat16 if cfg.deepspeed.precision == "bf16" else torch.float32)
        objective.to(device)
        params = objective.trainable_parameters()
        optimizer = build_optimizer(params, cfg.train)
        scheduler = build_lr_scheduler(optimizer, cfg.train)
        self.ds_config = build_deepspeed_config(cfg.train, cfg.deepspeed, world_size)
        if rank == 0:
            log.info("DeepSpeed: %s; %.2fM trainable parameters", describe(self.ds_config),
                     sum(p.numel() for p in params) / 1e6)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=objective, optimizer=optimizer, lr_scheduler=scheduler, config=self.ds_config,
            dist_init_required=False,
        )
        self.objective = self.engine.module
        trainable = {id(p) for p in params}
        named = [(n, p) for n, p in self.objective.named_parameters() if id(p) in trainable]
        self.ema = EMA(named, cfg.train.ema_decay) if cfg.train.ema else None
        self.state = TrainState(world_size=world_size, batch_size=cfg.train.batch_size, grad_accum=cfg.train.grad_accum)

    # -- steps --------------------------------------------------------------------------------------
    def _generator(self, *parts: Any) -> torch.Generator:
        seed = stable_seed(self.cfg.train.seed, *parts, self.rank)
        torch.manual_seed(seed)  # anything inside the objective that still uses the global RNG
        return torch.Generator(device=self.device).manual_seed(seed)

    def _mean_terms(self, totals: dict[str, torch.Tensor], count: int) -> dict[str, float]:
        """Average loss terms over micro-steps and ranks (every rank holds the same term names)."""
        names = sorted(totals)
        stacked = torch.stack([totals[n].detach().float() / count for n in names]).to(self.device)
        if dist.is_initialized() and self.world_size > 1:
            dist.all_reduce(stacked)
            stacked /= self.world_size
        return {n: float(v) for n, v in zip(names, stacked.cpu(), strict=True)}

    def train_step(self, micro_batches: list[dict[str, Any]]) -> dict[str, float]:
        """One optimizer step over ``grad_accum`` micro-batches; returns rank-averaged loss terms, lr and grad norm."""
        if len(micro_batches) != self.cfg.train.grad_accum:
            raise ValueError(f"train_step got {len(micro_batches)} micro-batches, train.grad_accum is "
                             f"{self.cfg.train.grad_accum}")
        self.engine.train()
        lr = float(self.scheduler.get_last_lr()[0])  # the rate this step applies (the scheduler moves on after it)
        totals: dict[str, torch.Tensor] = {}
        for i, batch in enumerate(micro_batches):
            out = self.engine(batch, generator=self._generator("train", self.state.step, i))
            self.engine.backward(out["loss"])
            self.engine.step()
            for name, value in out.items():
                totals[name] = totals.get(name, 0.0) + value.detach().float()
        if self.ema is not None:
            self.ema.update()
        self.state = TrainState(self.state.step + 1, self.state.epoch, self.state.epoch_step + 1,
                                self.world_size, self.cfg.train.batch_size, self.cfg.train.grad_accum)
        metrics = self._mean_terms(totals, len(micro_batches))
        metrics["lr"] = lr
        norm = self.engine.get_global_grad_norm()
        if norm is not None:
            metrics["grad_norm"] = float(norm)
        return metrics

    def next_epoch(self) -> None:
        self.state = TrainState(self.state.step, self.state.epoch + 1, 0, self.world_size,
                                self.cfg.train.batch_size, self.cfg.train.grad_accum)

    @torch.no_grad()
    def validate(self, batches: list[dict[str, Any]]) -> dict[str, float]:
        """Loss terms on fixed batches with fixed noise: comparable across steps and runs."""
        if not batches:
            return {}
        self.engine.eval()
        totals: dict[str, torch.Tensor] = {}
        for i, batch in enumerate(batches):
            seed = stable_seed(self.cfg.train.seed, "validate", i)
            out = self.engine(batch, generator=torch.Generator(device=self.device).manual_seed(seed))
            for name, value in out.items():
                totals[name] = totals.get(name, 0.0) + value.detach().float()
        self.engine.train()
        # every rank saw the same batches: average anyway so a rank-dependent op cannot go unnoticed
        return {f"val/{k}": v for k, v in self._mean_terms(totals, len(batches)).items()}

    # -- checkpoints --------------------------------------------------------------------------------
    def save_checkpoint(self, folder: str | Path) -> None:
        """Write this rank's part of a checkpoint into local ``folder`` (collective: every rank calls it)."""
        folder = Path(folder)
        self.engine.save_checkpoint(str(folder), tag=DS_TAG, client_state={"train_state": json.loads(self.state.to_json())},
                                    exclude_frozen_parameters=True)
        if self.rank == 0:
            (folder / "state.json").write_bytes(self.state.to_json())
            (folder / "config.yaml").write_text(config_to_yaml(self.cfg))
            if self.ema is not None:
                from safetensors.torch import save_file

                save_file(self.ema.state_dict(), str(folder / "ema.safetensors"))

    def load_checkpoint(self, folder: str | Path) -> TrainState:
        """Restore weights, optimizer, scheduler, EMA and counters from local ``folder``."""
        folder = Path(folder)
        saved = TrainState.from_json((folder / "state.json").read_bytes())
        # ZeRO's optimizer partitions are per rank: another worker count can take the weights, not the moments
        same_world = saved.world_size == self.world_size
        if not same_world:
            if self.stage == 3:
                raise ValueError(
                    f"checkpoint {folder} was written by {saved.world_size} workers and ZeRO-3 partitions the "
                    f"weights themselves across them: relaunch with train.num_workers={saved.world_size}")
            log.warning("checkpoint written by %d workers, resuming on %d: weights and step kept, the optimizer "
                        "moments restart", saved.world_size, self.world_size)
        path, _ = self.engine.load_checkpoint(str(folder), tag=DS_TAG, load_optimizer_states=same_world,
                                              load_lr_scheduler_states=True, custom_load_fn=self._load_module)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint under {folder}/{DS_TAG}")
        self.state = saved
        if self.ema is not None:
            from safetensors.torch import load_file

            ema_file = folder / "ema.safetensors"
            if ema_file.exists():
                self.ema.load_state_dict(load_file(str(ema_file)))
            else:
                log.warning("checkpoint %s has no EMA: the EMA restarts from the current weights", folder)
        return self.state

    @staticmethod
    def _load_module(src: dict[str, torch.Tensor], dst: torch.nn.Module) -> None:
        """Strict loading: every trainable weight must come from the checkpoint and nothing unknown may be in
        it. Only the frozen base weights may be absent (``save_checkpoint`` never writes them)."""
        result = dst.load_state_dict(src, strict=False)
        frozen = {n for n, p in dst.named_parameters() if not p.requires_grad}
        missing = [k for k in result.missing_keys if k not in frozen]
        if missing or result.unexpected_keys:
            raise CheckpointMismatch(
                f"the checkpoint does not fit the model: {len(missing)} trainable weights missing "
                f"{missing[:5]}, {len(result.unexpected_keys)} unknown {list(result.unexpected_keys)[:5]}; it was "
                "trained with another model config (see its config.yaml): train into a new --output")

    # -- export -------------------------------------------------------------------------------------
    @contextmanager
    def _whole_parameters(self):
        """ZeRO-3 keeps a slice of every parameter per rank: gather them all (collective) for export."""
        if self.stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(self.objective.parameters()), modifier_rank=None):
                yield
        else:
            with nullcontext():
                yield

    def export(self, folder: str | None = None) -> str | None:
        """Rank 0 writes the export (EMA weights when enabled) to a local folder: ``controlnet/`` and the
        reference to the base models (``spasem_export.json``), plus the whole pipeline with ``train.export_full``.

        Collective under ZeRO-3; returns the folder on rank 0, None elsewhere.
        """
        with self._whole_parameters():
            if self.rank != 0:
                return None
            folder = folder or tempfile.mkdtemp(prefix="export-")
            state = None
            if self.ema is not None:
                prefix = "controlnet."
                state = {k: v.detach().float().cpu().clone() for k, v in self.objective.controlnet.state_dict().items()}
                for name, value in self.ema.state_dict().items():
                    if name.startswith(prefix):
                        state[name[len(prefix):]] = value
            elif self.stage == 3:
                state = {k: v.detach().float().cpu().clone() for k, v in self.objective.controlnet.state_dict().items()}
            self.objective.export(folder, controlnet_state_dict=state, full=self.cfg.train.export_full)
            write_reference(folder, self.cfg.models, self.cfg.model)
            return folder


def set_accelerator(use_gpu: bool) -> None:
    """DeepSpeed picks its accelerator at import: CPU runs need DS_ACCELERATOR=cpu before ``import deepspeed``.

    On CPU, DeepSpeed's shared-memory all-reduce is a C++ op compiled at run time (30-50 s per fresh
    machine) and can hang peers on CPUs without AVX-512; gloo does the collectives instead.
    """
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if use_gpu else "cpu")
    if not use_gpu:
        # by name in sys.modules: ``import deepspeed.comm.torch as m`` binds the ``torch`` package that
        # deepspeed.comm re-exports under that name, so patching it never reached DeepSpeed
        ds_torch = importlib.import_module("deepspeed.comm.torch")
        ds_torch.build_shm_op = lambda: None
