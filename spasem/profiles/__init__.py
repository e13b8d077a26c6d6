"""Model profiles: where every model of the pipeline is loaded from.

A real profile names hub ids or local paths (``models.*``). The ``tiny`` profile builds random-init
tiny versions of every model from the real config classes, deterministically, once, into
``models.cache_dir/tiny/<name>`` with ``save_pretrained``; from then on stages load them by path with
exactly the code that loads real weights. A file lock and a completion marker per model make
concurrent Ray actors build each model once.
"""

from __future__ import annotations

import importlib
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock

from spasem.config.annotate import ModelsConfig

log = logging.getLogger(__name__)
MODEL_NAMES = ("llava", "grounding_dino", "clip_vision", "dinov2", "sd")
TINY_VERSION = "1"  # bump when a tiny builder changes, so caches are rebuilt


def _builder(name: str) -> Callable[[Path], None]:
    """The tiny builder of ``name``, imported only when that model must be built."""
    module, func = {
        "llava": ("spasem.profiles.tiny_vlm", "build_llava"),
        "grounding_dino": ("spasem.profiles.tiny_vlm", "build_grounding_dino"),
        "clip_vision": ("spasem.profiles.tiny_sd", "build_clip_vision"),
        "dinov2": ("spasem.profiles.tiny_sd", "build_dinov2"),
        "sd": ("spasem.profiles.tiny_sd", "build_sd"),
    }[name]
    return getattr(importlib.import_module(module), func)


def build_once(target: Path, build: Callable[[Path], None], what: str) -> str:
    """Run ``build(target)`` once across processes (a file lock); a marker file says the folder is complete,
    so a build killed half-way is redone from scratch."""
    done = target / ".complete"
    target.parent.mkdir(parents=True, exist_ok=True)
    if not done.exists():
        with FileLock(str(target) + ".lock"):
            if not done.exists():
                log.info("building %s into %s", what, target)
                shutil.rmtree(target, ignore_errors=True)
                target.mkdir(parents=True)
                build(target)
                done.write_text("ok")
    return str(target)


def ensure_tiny(cache_dir: str | Path, names: tuple[str, ...] = MODEL_NAMES) -> dict[str, str]:
    """Build (once) and return the paths of the tiny models ``names``."""
    root = Path(cache_dir).expanduser().resolve() / f"tiny-v{TINY_VERSION}"
    # the builder is imported only when a model must be built
    return {name: build_once(root / name, lambda t, n=name: _builder(n)(t), f"tiny {name}") for name in names}


def resolve_models(cfg: ModelsConfig, names: tuple[str, ...] = MODEL_NAMES) -> dict[str, str]:
    """Model name -> local path or hub id for ``names``, building the tiny profile's models on first use."""
    if cfg.profile == "tiny":
        return ensure_tiny(cfg.cache_dir, names)
    return {name: getattr(cfg, name) for name in names}


def model_id(cfg: ModelsConfig, name: str) -> str:
    """What goes into markers and members as the model of ``name``: the hub id / path, or ``tiny-vN/name``.

    Never the tiny cache's absolute path, so markers do not depend on where the cache lives.
    """
    if name not in MODEL_NAMES:
        raise KeyError(f"unknown model {name!r}; expected one of {MODEL_NAMES}")
    return f"tiny-v{TINY_VERSION}/{name}" if cfg.profile == "tiny" else str(getattr(cfg, name))
