"""Model profiles: where every model of the pipeline is loaded from.

A real profile names hub ids or local paths (``models.*``). The ``tiny`` profile builds random-init
tiny versions of every model from the real config classes, deterministically, once, into
``models.cache_dir/tiny/<name>`` with ``save_pretrained``; from then on stages load them by path with
exactly the code that loads real weights. A file lock and a completion marker per model make
concurrent Ray actors build each model once.

No silent toy models: every entry point announces the tiny profile (a warning) unless it runs on the
bundled sample photos, annotated markers record ``profile`` beside the model ids, and training refuses
shards made with other models than its config names (``check_shard_models``).
"""

from __future__ import annotations

import importlib
import logging
import os
import shutil
from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager
from pathlib import Path

import yaml
from filelock import FileLock

from spasem.config import ConfigError, StorageConfig, sample_photos
from spasem.config.annotate import ModelsConfig
from spasem.shards import FINAL_DIR, PAIRS_DIR, ShardInfo, list_shards, shard_folder
from spasem.storage import Store

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


@contextmanager
def _every_rank_writes():
    """transformers' ``save_pretrained`` writes nothing on a rank other than 0 once torch.distributed is up
    (``DistributedMixin.should_save_on_this_rank``). A training worker of any rank may take the build lock
    first: without this, rank 1 built an SD folder with an empty ``text_encoder/`` and marked it complete."""
    try:
        from transformers.distributed.mixin import DistributedMixin
    except ImportError:  # a transformers without the rank gate
        yield
        return
    gate = DistributedMixin.should_save_on_this_rank
    DistributedMixin.should_save_on_this_rank = lambda self, is_main_process: is_main_process
    try:
        yield
    finally:
        DistributedMixin.should_save_on_this_rank = gate


def _build_tiny(name: str, target: Path) -> None:
    with _every_rank_writes():
        _builder(name)(target)


def ensure_tiny(cache_dir: str | Path, names: tuple[str, ...] = MODEL_NAMES) -> dict[str, str]:
    """Build (once) and return the paths of the tiny models ``names``."""
    root = Path(cache_dir).expanduser().resolve() / f"tiny-v{TINY_VERSION}"
    # the builder is imported only when a model must be built
    return {name: build_once(root / name, lambda t, n=name: _build_tiny(n, t), f"tiny {name}") for name in names}


def resolve_models(cfg: ModelsConfig, names: tuple[str, ...] = MODEL_NAMES) -> dict[str, str]:
    """Model name -> local path or hub id for ``names``, building the tiny profile's models on first use."""
    if cfg.profile == "tiny":
        return ensure_tiny(cfg.cache_dir, names)
    return {name: getattr(cfg, name) for name in names}


RAY_PACKAGE = ("runtime_resources", "working_dir_files")  # where `ray job submit --working-dir .` unpacks a job


def fixed_cache(cfg: ModelsConfig) -> ModelsConfig:
    """``cfg`` with an absolute ``cache_dir`` (relative: to this process's working directory). Ray Train
    moves its workers into a folder per run: a location fixed before the section travels lets every
    process of a node share one build, and each node fills that location itself.

    A job submitted with ``--working-dir`` runs in the folder Ray unpacked it into, which Ray deletes
    once no job uses that package: a relative cache there would vanish under running workers (and be
    rebuilt by every job), so it goes under ``~/.cache/spasem`` instead."""
    path = Path(cfg.cache_dir).expanduser()
    if not path.is_absolute() and all(part in Path.cwd().parts for part in RAY_PACKAGE):
        path = Path.home() / ".cache" / "spasem" / Path(*[p for p in path.parts if p != ".cache"] or ["models"])
        log.info("models.cache_dir=%s is relative and this job runs in Ray's unpacked working_dir: using %s",
                 cfg.cache_dir, path)
    cache = str(path.absolute())
    return cfg if cache == cfg.cache_dir else cfg.model_copy(update={"cache_dir": cache})


class NodePaths(Mapping[str, str]):
    """``resolve_models`` done where a path is read, not where the mapping was made: handed to Ray actors
    and training workers, it resolves (the tiny profile: builds under the per-node file lock) on their own
    node, so none of them needs a folder that only the driver's machine has. It travels as the config.

    ``cfg.cache_dir`` is fixed first (``fixed_cache``)."""

    def __init__(self, cfg: ModelsConfig, names: tuple[str, ...] = MODEL_NAMES):
        self.cfg, self.names, self._paths = fixed_cache(cfg), tuple(names), {}

    def __getitem__(self, name: str) -> str:
        if name not in self.names:
            raise KeyError(name)
        if name not in self._paths:
            self._paths.update(resolve_models(self.cfg, (name,)))
        return self._paths[name]

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def __reduce__(self):  # never ship paths resolved on one machine to another
        return NodePaths, (self.cfg, self.names)

    def declared(self) -> dict[str, str]:
        """The configured ids/paths a driver can check without building anything ({} for the tiny profile)."""
        return {} if self.cfg.profile == "tiny" else resolve_models(self.cfg, self.names)


def model_id(cfg: ModelsConfig, name: str) -> str:
    """What goes into markers and members as the model of ``name``: the hub id / path, or ``tiny-vN/name``.

    Never the tiny cache's absolute path, so markers do not depend on where the cache lives.
    """
    if name not in MODEL_NAMES:
        raise KeyError(f"unknown model {name!r}; expected one of {MODEL_NAMES}")
    return f"tiny-v{TINY_VERSION}/{name}" if cfg.profile == "tiny" else str(getattr(cfg, name))


# -- no silent toy models ------------------------------------------------------------------------------
# the models behind each annotation stage, as the stage ids in shard markers name them
ANNOTATION_MODELS = {"captions": ("llava",), "grounding": ("grounding_dino",),
                     "embeddings": ("clip_vision", "dinov2"), "encode": ("sd",)}
TINY_WARNING = ("%s: models.profile=tiny: captions, boxes, features and outputs come from random-init TOY models "
                "built for tests and the demo, not from real weights; for real data pass --config "
                "configs/sd15.yaml (or another real profile)")


def stage_model_ids(cfg: ModelsConfig, names: Iterable[str]) -> dict[str, str]:
    """Annotation stage -> the model id its markers and members record (``+`` joins a stage's models)."""
    return {name: "+".join(model_id(cfg, m) for m in ANNOTATION_MODELS[name]) for name in names}


def _same_folder(a: str, b: str) -> bool:
    return "://" not in a and os.path.realpath(os.path.expanduser(a)) == os.path.realpath(b)


def announce_tiny(cfg: ModelsConfig, source: str | None, entry: str) -> bool:
    """Log a warning when the tiny profile runs on anything but the bundled sample photos (``source``: the
    photos the run's input came from, None when unknown). Returns whether it warned."""
    if cfg.profile != "tiny" or (source is not None and _same_folder(source, sample_photos())):
        return False
    log.warning(TINY_WARNING, entry)
    return True


def prepared_from(uri: str, storage: StorageConfig) -> str | None:
    """The photos a prepare output was made from: the ``input`` of its config.yaml (``uri`` may be the output
    or its shards folder), or None when there is none."""
    uri = uri.rstrip("/")
    for folder in (uri, *(uri[: -len(sub)] for sub in (f"/{FINAL_DIR}", f"/{PAIRS_DIR}") if uri.endswith(sub))):
        try:
            found = yaml.safe_load(storage.open(folder).read("config.yaml"))
        except (OSError, yaml.YAMLError):  # FileNotFoundError included
            continue
        return found.get("input") if isinstance(found, dict) else None
    return None


def check_shard_models(store: Store, cfg: ModelsConfig, shards: Iterable[ShardInfo] | None = None) -> dict[str, str]:
    """Refuse shards whose markers name annotation models that differ between shards or from ``cfg``'s,
    naming both; returns the stage -> model id the shards agree on. ``shards``: the listing of ``store``
    when the caller has it already (``list_shards`` reads every marker once, in parallel)."""
    folder = shard_folder(store)[0]
    if shards is None:
        folder, shards = list_shards(store)
    seen: dict[str, dict[str, str]] = {}  # stage -> model id -> the first shard that has it
    for info in shards:
        for stage, mid in info.stages.items():
            if stage in ANNOTATION_MODELS:
                seen.setdefault(stage, {}).setdefault(mid, folder.url(info.rel[:-4] + ".json"))
    expected = stage_model_ids(cfg, seen)
    problems = []
    for stage, ids in sorted(seen.items()):
        keys = " + ".join(f"models.{m}" for m in ANNOTATION_MODELS[stage])
        if len(ids) > 1:
            problems.append(f"{stage}: the shards disagree: " + ", ".join(f"{i!r} ({w})" for i, w in ids.items()))
        elif expected[stage] not in ids:
            ((mid, where),) = ids.items()
            problems.append(f"{stage}: the shards were made with {mid!r} ({where}), this config names "
                            f"{expected[stage]!r} ({keys}, profile {cfg.profile!r})")
    if problems:
        raise ConfigError(
            f"the shards under {store.uri} do not match the models of this run:\n  " + "\n  ".join(problems)
            + "\nTrain with the config the shards were prepared with (their config.yaml), or prepare them again "
              "with this one.")
    return {stage: next(iter(ids)) for stage, ids in seen.items()}
