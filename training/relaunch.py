"""Relaunch checks: a new launch on a RUN_URI that holds a checkpoint must be able to continue it.

The config a checkpoint was trained with (RUN_URI/config.yaml) is compared key by key with the new
one. Changes that break the checkpoint are refused before any worker starts, naming the keys:

- the trainable modules' shapes and wiring (``model.*``: fusion, attention, box tokens, widths, ...);
- the frozen base models the objective is built on (``models.sd``, ``models.clip_vision``,
  ``models.dinov2``, ``models.profile``) and the objective class (``train.objective``);
- the optimizer state's layout (``deepspeed.precision``; ``deepspeed.stage`` to or from 3, whose
  checkpoints hold the weights themselves in per-rank partitions);
- the shard members training reads (e.g. a run started on annotated shards relaunched on bare pairs:
  the conditioning the ControlNet learned from would change source mid-run).

Everything else (``train.max_steps``, the schedule, logging, checkpoint cadence, stream dropout, loss
weights, storage) is accepted; each launch appends one line to RUN_URI/launches.jsonl recording its
starting step, its shard members and the keys it changed (old and new values).
"""

from __future__ import annotations

import json
import time
from typing import Any

import yaml

from spasem.config import Config, ConfigError
from spasem.storage import Store

CONFIG = "config.yaml"
LAUNCHES = "launches.jsonl"
BREAKING = ("model.", "models.profile", "models.sd", "models.clip_vision", "models.dinov2", "train.objective",
            "deepspeed.precision")
# model.* keys that change how the modules run, never which weights they hold
SAFE_MODEL = ("model.dropout.", "model.original_image_ratio", "model.gradient_checkpointing", "model.lgcaa_clamp")


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def config_changes(saved: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Dotted key -> (saved value, new value) for every key whose value differs."""
    old, now = _flatten(saved), _flatten(new)
    return {k: (old.get(k), now.get(k)) for k in sorted(set(old) | set(now)) if old.get(k) != now.get(k)}


def breaking(changes: dict[str, tuple[Any, Any]]) -> list[str]:
    """The changed keys a checkpoint cannot survive."""
    out = []
    for key, (old, new) in changes.items():
        if key.startswith(SAFE_MODEL):
            continue
        if key.startswith(BREAKING) or (key == "deepspeed.stage" and 3 in (old, new)):
            out.append(key)
    return out


def _last_launch(run: Store) -> dict[str, Any] | None:
    if not run.exists(LAUNCHES):
        return None
    lines = [line for line in run.read(LAUNCHES).decode().splitlines() if line.strip()]
    return json.loads(lines[-1]) if lines else None


def check_relaunch(run: Store, cfg: Config, members: tuple[str, ...], checkpoint_step: int | None) -> dict:
    """Refuse a launch that would break RUN_URI's checkpoint; else record it. Returns the launch record."""
    new = cfg.model_dump(mode="json")
    changes: dict[str, tuple[Any, Any]] = {}
    if run.exists(CONFIG):
        changes = config_changes(yaml.safe_load(run.read(CONFIG).decode()) or {}, new)
    last = _last_launch(run)
    if last is not None and tuple(last.get("members", ())) != tuple(members):
        changes["shard members"] = (list(last.get("members", ())), list(members))
    if checkpoint_step is not None:
        bad = breaking(changes) + (["shard members"] if "shard members" in changes else [])
        if bad:
            detail = "; ".join(f"{k}: {changes[k][0]!r} -> {changes[k][1]!r}" for k in bad)
            raise ConfigError(
                f"{run.url('')} holds a checkpoint at step {checkpoint_step} that this launch cannot continue "
                f"({detail}): relaunch with the saved values (its {CONFIG}) or train into a new --output")
    record = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "from_step": checkpoint_step or 0,
              "members": list(members), "changed": {k: list(v) for k, v in changes.items()}}
    history = run.read(LAUNCHES).decode() if run.exists(LAUNCHES) else ""
    run.write(LAUNCHES, (history + json.dumps(record, sort_keys=True) + "\n").encode())
    run.write(CONFIG, yaml.safe_dump(new, sort_keys=False).encode())
    return record
