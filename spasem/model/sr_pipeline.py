"""``SpatialSemanticSRPipeline``: upscale one image with the Spatial-Semantic ControlNet (diffusers-native).

Components: the frozen SD parts (``vae``, ``text_encoder``, ``tokenizer``, ``unet``), the trained
``controlnet``, any diffusers ``scheduler``, and the frozen image encoders with their processors
(``clip_vision``/``clip_processor``, ``dino``/``dino_processor``). ``save_pretrained`` writes them in
diffusers' folder layout; ``from_pretrained`` loads them back.

A training export is smaller by default: ``controlnet/`` (the only trained part) and
``spasem_export.json``, a reference to the base models as configured (hub ids or paths, never a
machine's resolved cache path). ``load_sr_pipeline`` loads both layouts; for a reference it resolves
the base models on the machine that loads, so every node of a cluster finds (or builds) its own copy.

Classifier-free guidance follows XPSR: the unconditional stream replaces the high-level caption by
the negative prompt and keeps the grounding and visual tokens; its low-level caption is
``negative_prompt_low`` when given (XPSR's pipeline hard-codes "high resolution, best quality, clear"),
else the image's own.

``__call__`` samples as XPSR's pipeline does: the LR's latent (VAE encode of the bicubic upsample)
noised to the first timestep, then the whole schedule; and it tiles with the batch upscaler's code
(``spasem.model.tiled_diffusion.TiledUpscaler``), so any image size runs at the memory of one tile.
The sampler uses the two halves below: ``encode_conditioning`` per tile batch, ``predict_noise`` per
latent tile and step.
"""

from __future__ import annotations

import importlib.metadata
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL, DDPMScheduler, DiffusionPipeline, UNet2DConditionModel
from diffusers.image_processor import VaeImageProcessor

from spasem.config import ConfigError
from spasem.config.annotate import ModelsConfig
from spasem.config.upscale import NEGATIVE_PROMPT, UpscaleConfig
from spasem.encoders import ImageEncoders, encode_phrases, encode_prompts, load_text_encoder
from spasem.model.controlnet import SpatialSemanticControlNet, controlled_unet
from spasem.model.latents import decode_latents
from spasem.model.tiled_diffusion import TiledUpscaler, padded_latent_size
from spasem.profiles import model_id, resolve_models


@dataclass
class Conditioning:
    """Per-image conditioning tensors; ``negative_text`` (``negative_low``) is the unconditional stream's
    high (low) caption."""

    text_high: torch.Tensor
    text_low: torch.Tensor
    phrase_embeds: torch.Tensor
    boxes: torch.Tensor
    box_mask: torch.Tensor
    clip_tokens: torch.Tensor
    dino_tokens: torch.Tensor
    negative_text: torch.Tensor | None = None
    negative_low: torch.Tensor | None = None

    def repeat_to(self, n: int) -> Conditioning:
        """Each image's tensors repeated so the batch holds ``n`` rows (e.g. several tiles per image)."""
        b = self.text_high.shape[0]
        if n == b:
            return self
        if n % b:
            raise ValueError(f"{n} latent rows do not split evenly over {b} conditioned images")
        return Conditioning(**{f.name: None if getattr(self, f.name) is None
                               else getattr(self, f.name).repeat_interleave(n // b, dim=0) for f in fields(self)})


def _lr_array(image) -> np.ndarray:
    """PIL image or uint8 array ``[h,w,3]`` / ``[B,h,w,3]`` -> uint8 ``[B,h,w,3]``."""
    if isinstance(image, PIL.Image.Image):
        image = np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8 image [h, w, 3] (or PIL), got {arr.dtype} {arr.shape}")
    return arr


class SpatialSemanticSRPipeline(DiffusionPipeline):
    """LR image in, super-resolved image out (CFG with a negative prompt, any diffusers scheduler)."""

    model_cpu_offload_seq = "text_encoder->clip_vision->dino->controlnet->unet->vae"

    def __init__(self, vae, text_encoder, tokenizer, unet, controlnet, scheduler, clip_vision, clip_processor,
                 dino, dino_processor):
        super().__init__()
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                              controlnet=controlnet, scheduler=scheduler, clip_vision=clip_vision,
                              clip_processor=clip_processor, dino=dino, dino_processor=dino_processor)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    # -- conditioning -------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_conditioning(self, lr_images: np.ndarray, prompts_high: list[str], prompts_low: list[str],
                            phrases: list[list[str]] | None = None, boxes: list | None = None,
                            negative_prompt: str = NEGATIVE_PROMPT, do_cfg: bool = True,
                            negative_prompt_low: str | None = None) -> Conditioning:
        """Text, grounding and visual conditioning of ``B`` LR images (uint8 ``[B,h,w,3]``)."""
        lr_images = _lr_array(lr_images)
        b, k = lr_images.shape[0], self.controlnet.config.max_boxes
        tok, te = self.tokenizer, self.text_encoder
        text_high = encode_prompts(tok, te, [str(p) for p in prompts_high])
        text_low = encode_prompts(tok, te, [str(p) for p in prompts_low])
        phrases = [list(p) for p in phrases] if phrases is not None else [[] for _ in range(b)]
        phrase_embeds, phrase_mask = encode_phrases(tok, te, phrases, k)
        box_tensor = torch.zeros(b, k, 4, device=te.device)
        box_mask = torch.zeros(b, k, device=te.device)
        for i, row in enumerate(boxes if boxes is not None else [None] * b):
            if row is None or len(row) == 0:
                continue
            row = torch.as_tensor(np.asarray(row, dtype=np.float32).reshape(-1, 4)[:k], device=te.device)
            box_tensor[i, : len(row)] = row
            box_mask[i, : len(row)] = 1
        encoders = ImageEncoders(self.clip_vision, self.clip_processor, self.dino, self.dino_processor)
        feats = encoders.encode(lr_images)
        negative = encode_prompts(tok, te, [negative_prompt] * b) if do_cfg else None
        negative_low = encode_prompts(tok, te, [negative_prompt_low] * b) if do_cfg and negative_prompt_low else None
        return Conditioning(text_high, text_low, phrase_embeds, box_tensor, box_mask * phrase_mask.to(box_mask.dtype),
                            feats["clip_tokens"], feats["dino_tokens"], negative, negative_low)

    # -- one denoising evaluation -------------------------------------------------------------------
    @torch.no_grad()
    def predict_noise(self, latents: torch.Tensor, t: torch.Tensor | int, control_image: torch.Tensor,
                      cond: Conditioning, guidance_scale: float, conditioning_scale: float = 1.0) -> torch.Tensor:
        """The UNet's prediction (noise or v) for ``latents`` at ``t``, with CFG applied.

        ``control_image`` is the LR upsampled to the latents' pixel size (``8 * h8``), in [-1, 1]; any
        tile whose latent side is a multiple of 8 works.
        """
        c = cond.repeat_to(latents.shape[0])
        do_cfg = c.negative_text is not None and guidance_scale > 1.0
        text_high, text_low = c.text_high, c.text_low
        extra = [c.phrase_embeds, c.boxes, c.box_mask, c.clip_tokens, c.dino_tokens]
        model_in, ctrl = latents, control_image
        if do_cfg:
            model_in, ctrl = torch.cat([latents] * 2), torch.cat([control_image] * 2)
            text_high = torch.cat([c.negative_text, text_high])
            text_low = torch.cat([c.negative_low if c.negative_low is not None else text_low, text_low])
            extra = [torch.cat([x] * 2) for x in extra]
        model_in = self.scheduler.scale_model_input(model_in, t)
        phrase_embeds, boxes, box_mask, clip_tokens, dino_tokens = extra
        pred, _ = controlled_unet(
            self.unet, self.controlnet, model_in, t, ctrl, text_high, conditioning_scale, text_low=text_low,
            boxes=boxes, phrase_embeds=phrase_embeds, box_mask=box_mask, clip_tokens=clip_tokens,
            dino_tokens=dino_tokens,
        )
        if do_cfg:
            uncond, cond_pred = pred.chunk(2)
            pred = uncond + guidance_scale * (cond_pred - uncond)
        return pred.to(latents.dtype)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [-1, 1]."""
        return decode_latents(self.vae, latents)

    # -- the whole image ----------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, image, prompt: str = "", prompt_low: str = "", phrases: list[str] | None = None,
                 boxes=None, negative_prompt: str = NEGATIVE_PROMPT, num_inference_steps: int = 20,
                 guidance_scale: float = 5.5, conditioning_scale: float = 1.0, generator: torch.Generator | None = None,
                 output_type: str = "pil", upscale: int = 4, tile_size: int | None = None, tile_overlap: int = 16,
                 tile_batch: int = 1, realism: float = 1.0, color_fix: str = "none",
                 negative_prompt_low: str | None = None, added_noise_level: int | None = None):
        """Upscale one LR image by ``upscale``; returns a PIL image or a float ``[H, W, 3]`` array in [0, 1].

        Sampling starts from the LR's latent noised to the first timestep (``realism`` 1; lower values
        start later in the schedule, see docs/upscale.md). ``tile_size`` (latent px, a multiple of 8)
        tiles the latent with ``tile_overlap``, ``tile_batch`` tiles per model call; ``None`` runs the
        whole image as one tile. The scheduler is the pipeline's own (``pipe.scheduler``).
        """
        if output_type not in ("pil", "np"):
            raise ValueError(f"output_type must be 'pil' or 'np', got {output_type!r}")
        lr = _lr_array(image)[0]
        if tile_size is None:  # one tile covering the whole (padded) latent
            tile_size, tile_overlap = max(padded_latent_size(lr.shape[0] * upscale, lr.shape[1] * upscale,
                                                             self.vae_scale_factor)), 0
        cfg = UpscaleConfig(
            scale=upscale, steps=num_inference_steps, guidance_scale=guidance_scale,
            conditioning_scale=conditioning_scale, negative_prompt=negative_prompt,
            negative_prompt_low=negative_prompt_low, added_noise_level=added_noise_level,
            scheduler=type(self.scheduler).__name__, tile_size=tile_size, tile_overlap=tile_overlap,
            tile_batch=tile_batch, realism=realism, color_fix=color_fix,
        )
        if generator is None:  # fresh noise per call, as diffusers pipelines without a generator
            generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,))))
        upscaler = TiledUpscaler(self, cfg, self._execution_device, self.vae.dtype)
        sr = upscaler(lr, prompt, prompt_low, list(phrases or []),
                      None if boxes is None else np.asarray(boxes, np.float32).reshape(-1, 4), generator=generator)
        if output_type == "pil":
            return PIL.Image.fromarray(sr)
        return sr.astype(np.float32) / 255.0


def build_sr_pipeline(paths: Mapping[str, str], model_cfg, dtype: torch.dtype = torch.float32) -> SpatialSemanticSRPipeline:
    """The frozen parts loaded by path (``sd``, ``clip_vision``, ``dinov2``) and a float32 ControlNet.

    With ``paths["controlnet"]`` (an exported ``controlnet`` folder) the ControlNet is loaded from it;
    otherwise it is a fresh ``SpatialSemanticControlNet.from_unet`` copy shaped by ``model_cfg``
    (``spasem.config.model.ModelConfig``). Training and the untrained upscale build both start here.
    """
    sd = paths["sd"]
    unet = UNet2DConditionModel.from_pretrained(sd, subfolder="unet", torch_dtype=dtype)
    vae = AutoencoderKL.from_pretrained(sd, subfolder="vae", torch_dtype=dtype)
    tokenizer, text_encoder = load_text_encoder(sd, dtype=dtype)
    encoders = ImageEncoders.load(paths["clip_vision"], paths["dinov2"], dtype=dtype)
    scheduler = DDPMScheduler.from_pretrained(sd, subfolder="scheduler")
    if paths.get("controlnet"):
        controlnet = SpatialSemanticControlNet.from_pretrained(paths["controlnet"], torch_dtype=torch.float32)
    else:
        # load_state_dict copies (and casts) the UNet's weights into the float32 branch
        controlnet = SpatialSemanticControlNet.from_unet(
            unet, text_dim=text_encoder.config.hidden_size,
            clip_dim=encoders.clip.config.hidden_size, dino_dim=encoders.dino.config.hidden_size,
            **model_cfg.controlnet_kwargs(),
        )
    return SpatialSemanticSRPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, controlnet=controlnet,
        scheduler=scheduler, clip_vision=encoders.clip, clip_processor=encoders.clip_processor,
        dino=encoders.dino, dino_processor=encoders.dino_processor,
    )


# -- the export: the trained ControlNet plus a reference to its base models -------------------------
INDEX = "model_index.json"          # a self-contained pipeline folder (save_pretrained): diffusers reads it first
REFERENCE = "spasem_export.json"    # the default export: controlnet/ + the base models it was trained on
CONTROLNET = "controlnet"
BASE_MODELS = ("sd", "clip_vision", "dinov2")  # the frozen models an export refers to
FORMAT_VERSION = 1


def export_layout(has: Callable[[str], bool]) -> str | None:
    """``"pipeline"`` (model_index.json), ``"reference"`` (spasem_export.json) or None, given an existence test
    over the folder's relative paths (a local folder, or HEAD requests on an S3 prefix: no download)."""
    if has(INDEX):
        return "pipeline"
    if has(REFERENCE) and has(f"{CONTROLNET}/config.json"):
        return "reference"
    return None


def write_reference(folder: str | Path, models: ModelsConfig, model_cfg) -> None:
    """``folder/spasem_export.json``: the base models as the user configured them (hub ids or paths, never
    a machine's resolved cache path, so every machine resolves them itself) and the model config."""
    try:
        version = importlib.metadata.version("spasem-sr")
    except importlib.metadata.PackageNotFoundError:  # a source tree that was never installed
        version = "unknown"
    ref = {
        "format": "spasem-sr-export", "format_version": FORMAT_VERSION, "spasem_sr": version,
        "controlnet": CONTROLNET,
        "models": {"profile": models.profile, **{name: getattr(models, name) for name in BASE_MODELS}},
        "model_ids": {name: model_id(models, name) for name in BASE_MODELS},
        "model": model_cfg.model_dump(mode="json"),
    }
    Path(folder, REFERENCE).write_text(json.dumps(ref, indent=1, sort_keys=True) + "\n")


def reference_paths(folder: str | Path, models: ModelsConfig | None = None) -> dict[str, str]:
    """The model paths of a reference export on this machine: its base models resolved here (the tiny
    profile built into ``models.cache_dir``), ``controlnet`` the export's own folder."""
    ref = json.loads(Path(folder, REFERENCE).read_text())
    if ref.get("format_version", 0) > FORMAT_VERSION:
        raise ConfigError(f"{folder} is a format {ref['format_version']} export; this install reads format "
                          f"{FORMAT_VERSION}: upgrade spasem-sr (the export was written by {ref.get('spasem_sr')})")
    local = models or ModelsConfig()
    base = ModelsConfig(**ref["models"], cache_dir=local.cache_dir)
    for name, recorded in ref.get("model_ids", {}).items():
        if name in BASE_MODELS and model_id(base, name) != recorded:
            raise ConfigError(f"{folder} was trained on {recorded!r} but models.{name} resolves to "
                              f"{model_id(base, name)!r} here: the tiny models changed since; train again")
    paths = resolve_models(base, BASE_MODELS)
    paths[CONTROLNET] = str(Path(folder, ref.get("controlnet", CONTROLNET)))
    return paths


def load_sr_pipeline(path: str, device: str = "cpu", dtype: torch.dtype = torch.float32,
                     models: ModelsConfig | None = None) -> SpatialSemanticSRPipeline:
    """An export on ``device`` in ``dtype``: a self-contained ``save_pretrained`` folder (model_index.json),
    or a ControlNet-only export whose base models (spasem_export.json) are resolved on this machine
    (``models``: where the tiny profile builds them)."""
    layout = export_layout(lambda rel: Path(path, rel).is_file())
    if layout is None:
        raise FileNotFoundError(
            f"{path} is not a training export (no {INDEX} nor {REFERENCE} + {CONTROLNET}/); pass --model with "
            "a training export (RUN_URI/export) or leave it out to use the untrained tiny-profile build"
        )
    if layout == "pipeline":
        pipe = SpatialSemanticSRPipeline.from_pretrained(path, dtype=dtype)
    else:
        pipe = build_sr_pipeline(reference_paths(path, models), None, dtype)
        pipe.controlnet.to(dtype)  # as from_pretrained(dtype=...) loads every part: both layouts run alike
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe
