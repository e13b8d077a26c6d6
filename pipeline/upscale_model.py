"""The model ``pipeline.upscale`` runs: ``--model`` / ``upscale.model``, or the untrained tiny build.

``--model`` names a training export (``RUN_URI/export``), local or ``s3://``, in either layout: the
default ControlNet-only export with ``spasem_export.json`` (its base models are resolved where it
loads) or a self-contained ``model_index.json`` folder (``train.export_full``). The driver only checks
it (``model_uri``: no weights read); the diffusion actors resolve it on their own nodes
(``spasem.model.export.local_model``): a node never reads a folder only the driver has.
"""

from __future__ import annotations

from spasem.config import Config, ConfigError
from spasem.model.export import check_model, local_model


def model_uri(cfg: Config) -> str | None:
    """``upscale.model`` once checked on the driver (one-line errors before any actor starts), or None:
    the tiny profile's untrained build, which each node makes for itself."""
    model = cfg.upscale.model
    if model:
        return check_model(model, cfg.storage)
    if cfg.models.profile != "tiny":
        raise ConfigError(
            f"models.profile={cfg.models.profile!r} has no default SR model: pass --model with a training export"
        )
    return None


def resolve_model(cfg: Config) -> str:
    """The model's local folder on this machine (fetched or built here): for in-process use (tests,
    benchmarks); the Ray stages resolve ``model_uri(cfg)`` themselves."""
    return local_model(model_uri(cfg), cfg.models, cfg.model, cfg.storage)
