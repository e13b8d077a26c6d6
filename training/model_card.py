"""The export's model card (``RUN_URI/export/README.md``), in Hugging Face's format: YAML front matter
(``base_model``, ``license``, ``tags``) and a body with what was trained, on which data, for how many
steps, from which base models under which licences, how to load it, and the training config.

The licence is the base model's: read from the ``license:`` of its own README.md front matter when it
is a local folder, else from a table of the hub ids this project is configured with; otherwise the
card sends the reader to the base model's card. The tiny profile's random-init models have none.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from spasem.config import Config, config_to_yaml
from spasem.model.sr_pipeline import BASE_MODELS, CONTROLNET, INDEX, REFERENCE

# licences of the hub ids the configs name; anything else: the base model's own card says
LICENCES = {
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "creativeml-openrail-m",
    "runwayml/stable-diffusion-v1-5": "creativeml-openrail-m",
    "CompVis/stable-diffusion-v1-4": "creativeml-openrail-m",
    "stabilityai/stable-diffusion-2-1": "openrail++",
    "stabilityai/stable-diffusion-2-1-base": "openrail++",
    "openai/clip-vit-large-patch14": "mit",
    "facebook/dinov2-base": "apache-2.0",
    "facebook/dinov2-large": "apache-2.0",
}
SEE_CARD = "see the base model's card"
TINY = "random-init tiny test models (profile `tiny`): no licence of their own, not for use"


def front_matter(readme: Path) -> dict:
    """The YAML front matter of a model card (``---`` ... ``---`` at its top), {} when it has none."""
    try:
        text = readme.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return {}
    if not text.startswith("---"):
        return {}
    head, sep, _ = text[3:].partition("\n---")
    try:
        found = yaml.safe_load(head) if sep else None
    except yaml.YAMLError:
        return {}
    return found if isinstance(found, dict) else {}


def base_licence(ref: str) -> str | None:
    """The licence of base model ``ref``: its README's ``license:`` for a local folder, the table for a
    known hub id, else None."""
    folder = Path(ref).expanduser()
    if folder.is_dir():
        found = front_matter(folder / "README.md").get("license")
        return str(found) if found else None
    return LICENCES.get(ref)


def _is_hub_id(ref: str) -> bool:
    return ref.count("/") == 1 and not ref.startswith((".", "/", "~")) and not Path(ref).expanduser().exists()


def model_card(cfg: Config, step: int, epoch: int, data: str) -> str:
    """README.md of an export: what was trained, on what, for how long, from which base and under which licence."""
    m = cfg.models
    bases = {name: getattr(m, name) for name in BASE_MODELS}
    meta: dict = {}
    if m.profile == "tiny":
        licence, lines = "other", [TINY]
    else:
        licence = base_licence(m.sd) or "other"
        if _is_hub_id(m.sd):
            meta["base_model"] = m.sd
        lines = [f"`models.{name}`: `{ref}`, licence: {base_licence(ref) or SEE_CARD}" for name, ref in bases.items()]
    meta.update(license=licence, library_name="diffusers", pipeline_tag="image-to-image",
                tags=["super-resolution", "controlnet", "spatial-semantic-controlnet", "xpsr"])
    full = cfg.train.export_full
    t = cfg.train
    return (
        f"---\n{yaml.safe_dump(meta, sort_keys=False)}---\n\n"
        "# Spatial-Semantic ControlNet super-resolution\n\n"
        f"Trained by `python -m training.launch` for {step} optimizer steps (epoch {epoch}) with "
        f"{t.num_workers} workers x batch {t.batch_size} x accumulation {t.grad_accum}"
        f"{' (EMA weights, decay ' + str(t.ema_decay) + ')' if t.ema else ''}.\n\n"
        "## What this folder holds\n\n"
        f"- `{CONTROLNET}/`: the trained Spatial-Semantic ControlNet (diffusers `save_pretrained`, safetensors)\n"
        f"- `{REFERENCE}`: the base models it runs on, as configured (`models.profile`, `models.sd`, "
        "`models.clip_vision`, `models.dinov2`), and the `model` config section\n"
        + (f"- `{INDEX}` and the frozen parts (`unet`, `vae`, `text_encoder`, `tokenizer`, `scheduler`, "
           "`clip_vision`, `dino` and their processors): a self-contained pipeline (`train.export_full`)\n"
           if full else "")
        + "- `config.yaml`: the training config; `export.json`: the step\n\n"
        "## Use\n\n"
        "```\npython -m pipeline.upscale --model <this folder or its s3:// URI> --input IMAGES --output OUT\n```\n\n"
        + ("The folder loads on its own (`model_index.json`)." if full else
           "The base models are resolved where the export loads (hub ids from the Hugging Face cache, local "
           "paths on that machine, the tiny profile built there); `train.export_full: true` writes a "
           "self-contained folder instead.")
        + f"\n\n## Data\n\n{data}\n\n## Base models and licence\n\n" + "".join(f"- {line}\n" for line in lines)
        + "\nThe trained weights inherit the base model's licence and its use restrictions.\n\n"
        f"## Training config\n\n```yaml\n{config_to_yaml(cfg)}```\n"
    )
