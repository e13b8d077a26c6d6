"""The model ``pipeline.upscale`` loads: ``--model`` / ``upscale.model``, or the untrained tiny build.

``--model`` names a ``SpatialSemanticSRPipeline`` folder (a training run's ``RUN_URI/export``), local
or ``s3://``; an S3 export is copied once into ``models.cache_dir/remote/<hash>`` so every actor loads
it from local disk. Without one, the ``tiny`` profile builds an untrained pipeline (the frozen tiny
SD, CLIP and DINOv2 plus a zero-initialized Spatial-Semantic ControlNet: the plain base model's
behaviour) once, under a file lock, with ``build_sr_pipeline``, where a training run's model starts.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from spasem.config import Config, ConfigError
from spasem.model.sr_pipeline import build_sr_pipeline
from spasem.profiles import TINY_VERSION, build_once, ensure_tiny
from spasem.storage import download_tree

log = logging.getLogger(__name__)
UNTRAINED = "sr-untrained"
INDEX = "model_index.json"  # what diffusers' from_pretrained reads first: a pipeline folder has one


def check_export(folder: str, given: str) -> str:
    """``folder`` if it holds a diffusers pipeline (``model_index.json``), else a ConfigError naming ``given``.

    Checked on the driver, before any actor starts: a bad path is one line, not a Ray traceback per actor.
    """
    if not (Path(folder) / INDEX).is_file():
        raise ConfigError(f"--model {given} has no {INDEX}: it is not a SpatialSemanticSRPipeline folder; "
                          "pass a training export (RUN_URI/export)")
    return folder


def build_untrained(cfg: Config) -> str:
    """The untrained SpatialSemanticSRPipeline of the tiny profile (built once into models.cache_dir)."""
    paths = ensure_tiny(cfg.models.cache_dir, ("sd", "clip_vision", "dinov2"))
    digest = hashlib.sha256(cfg.model.model_dump_json().encode()).hexdigest()[:10]
    target = Path(cfg.models.cache_dir).expanduser().resolve() / f"tiny-v{TINY_VERSION}" / f"{UNTRAINED}-{digest}"

    def build(folder: Path) -> None:
        build_sr_pipeline(paths, cfg.model).save_pretrained(str(folder), safe_serialization=True)

    return build_once(target, build, "the untrained tiny SR pipeline")


def fetch_remote(uri: str, cfg: Config) -> str:
    """Copy an ``s3://`` export folder to local disk once; returns the local folder."""
    store = cfg.storage.open(uri)
    digest = hashlib.sha256(store.uri.encode()).hexdigest()[:16]
    target = Path(cfg.models.cache_dir).expanduser().resolve() / "remote" / digest

    def build(folder: Path) -> None:
        if not download_tree(store, folder):
            raise FileNotFoundError(f"no files under {uri}: is it a training export (RUN_URI/export)?")

    return build_once(target, build, f"the model {store.uri}")


def resolve_model(cfg: Config) -> str:
    """Local folder of the pipeline to load (``upscale.model``, fetched if remote, else the tiny build)."""
    model = cfg.upscale.model
    if model:
        if model.startswith("s3://"):
            return check_export(fetch_remote(model, cfg), model)
        if not Path(model).expanduser().is_dir():
            raise FileNotFoundError(f"--model {model} is not a folder; pass a training export (RUN_URI/export)")
        return check_export(str(Path(model).expanduser().resolve()), model)
    if cfg.models.profile != "tiny":
        raise ConfigError(
            f"models.profile={cfg.models.profile!r} has no default SR model: pass --model with a training export"
        )
    return build_untrained(cfg)
