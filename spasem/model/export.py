"""Where an upscale's SR model comes from, resolved on the node that loads it.

``--model`` is a training export in a local folder or under an ``s3://`` prefix, or nothing (the tiny
profile's untrained build). Every Ray actor resolves it in its own ``__init__`` with ``local_model``:
an S3 export is copied once per node into ``models.cache_dir/remote/<hash>``, the untrained pipeline is
built once per node into the tiny cache, and a reference export's base models are resolved by
``load_sr_pipeline`` on the same node. Each build runs under a file lock (``build_once``), so the
actors of one node share it and no actor reads a folder that only the driver's machine has.

``check_model`` is the driver's early check, so a bad ``--model`` is one line before any actor
starts: two existence tests on the store (HEAD requests on S3), no weights read.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from spasem.config import ConfigError, StorageConfig
from spasem.config.annotate import ModelsConfig
from spasem.config.model import ModelConfig
from spasem.model.sr_pipeline import INDEX, REFERENCE, build_sr_pipeline, export_layout
from spasem.profiles import TINY_VERSION, build_once, ensure_tiny
from spasem.storage import download_tree

UNTRAINED = "sr-untrained"
STAMP = "export.json"  # training.checkpoints.publish_export writes it last: {"step": N}
TRAIN_HINT = "pass a training export (RUN_URI/export)"


def check_model(uri: str, storage: StorageConfig) -> str:
    """``uri`` if it holds an export (model_index.json, or spasem_export.json + controlnet/), else a
    one-line error naming it. Reads no weights."""
    if "://" not in uri and not Path(uri).expanduser().is_dir():
        raise FileNotFoundError(f"--model {uri} is not a folder; {TRAIN_HINT}")
    store = storage.open(uri)
    if export_layout(store.exists) is None:
        raise ConfigError(f"--model {uri} has neither {INDEX} nor {REFERENCE} with controlnet/: it is not a "
                          f"SpatialSemanticSRPipeline export; {TRAIN_HINT}")
    return uri


def fetch_export(uri: str, models: ModelsConfig, storage: StorageConfig) -> str:
    """Copy an ``s3://`` export to this node's ``models.cache_dir/remote/<hash>`` once; returns the folder.

    The hash covers ``export.json`` (the step a training run published, written last), so a newer
    export at the same URI is fetched again rather than served from an older copy."""
    store = storage.open(uri)
    stamp = store.read(STAMP) if store.exists(STAMP) else b""
    digest = hashlib.sha256(store.uri.encode() + b"\n" + stamp).hexdigest()[:16]
    target = Path(models.cache_dir).expanduser().resolve() / "remote" / digest

    def build(folder: Path) -> None:
        if not download_tree(store, folder):
            raise FileNotFoundError(f"no files under {uri}: is it a training export (RUN_URI/export)?")

    return build_once(target, build, f"the model {store.uri}")


def untrained_pipeline(models: ModelsConfig, model_cfg: ModelConfig) -> str:
    """The tiny profile's untrained SpatialSemanticSRPipeline (the frozen tiny SD, CLIP and DINOv2 plus a
    zero-initialized ControlNet: the base model's behaviour), built once into this node's cache."""
    paths = ensure_tiny(models.cache_dir, ("sd", "clip_vision", "dinov2"))
    digest = hashlib.sha256(model_cfg.model_dump_json().encode()).hexdigest()[:10]
    target = Path(models.cache_dir).expanduser().resolve() / f"tiny-v{TINY_VERSION}" / f"{UNTRAINED}-{digest}"

    def build(folder: Path) -> None:
        # seeded, so every node builds the same weights (the new layers' random parts included)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            build_sr_pipeline(paths, model_cfg).save_pretrained(str(folder), safe_serialization=True)

    return build_once(target, build, "the untrained tiny SR pipeline")


def local_model(uri: str | None, models: ModelsConfig, model_cfg: ModelConfig, storage: StorageConfig) -> str:
    """The local folder of the SR model on this node: the export ``uri`` (fetched if remote), or with no
    ``uri`` the tiny profile's untrained build (any other profile needs an export)."""
    if uri:
        folder = fetch_export(uri, models, storage) if "://" in uri else str(Path(uri).expanduser().resolve())
        if export_layout(lambda rel: Path(folder, rel).is_file()) is None:
            raise ConfigError(f"--model {uri} has neither {INDEX} nor {REFERENCE} with controlnet/; {TRAIN_HINT}")
        return folder
    if models.profile != "tiny":
        raise ConfigError(f"models.profile={models.profile!r} has no default SR model: pass --model with a "
                          "training export")
    return untrained_pipeline(models, model_cfg)
