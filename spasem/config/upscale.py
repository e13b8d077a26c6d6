"""Config section of ``pipeline.upscale`` (issue 7); `spasem.config` composes it into the one tree.

Units: ``tile_size``, ``tile_overlap`` and ``vae_tile_size`` are in *latent* pixels; one latent pixel
is ``vae_scale_factor`` (8) output pixels, so the default 64 / 16 means 512-pixel tiles overlapping
by 128 output pixels, Stable Diffusion 1.5's native size. See docs/upscale.md.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# diffusers scheduler classes that work with the tiled sampler (they all take the full-image
# prediction per step, so tiling never touches the scheduler's state)
SCHEDULERS = (
    "DDIMScheduler",
    "DDPMScheduler",
    "DPMSolverMultistepScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "UniPCMultistepScheduler",
    "PNDMScheduler",
    "LMSDiscreteScheduler",
    "HeunDiscreteScheduler",
)
NEGATIVE_PROMPT = "blurry, dotted, noise, unclear, low-res, over-smoothed"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DiffusePoolConfig(_Section):
    """The diffusion stage's actor pool (the other stages use ``annotate.*``'s pools)."""

    num_gpus: float = Field(0.0, ge=0, description="GPUs per diffusion actor (1 on a GPU cluster)")
    num_cpus: float = Field(0.5, gt=0, description="CPUs per diffusion actor (fractional on small machines)")
    pool_size: int = Field(1, ge=1, description="diffusion actors")
    batch_size: int = Field(1, ge=1, description="images per call; each image is tiled on its own")


class UpscaleConfig(_Section):
    model: str | None = Field(
        None, description="SpatialSemanticSRPipeline folder (a training export); default: untrained tiny-profile build"
    )
    scale: int = Field(4, ge=1, le=16, description="output side / input side")
    steps: int = Field(20, ge=1, description="denoising steps of the full schedule (realism runs a part of them)")
    guidance_scale: float = Field(5.5, ge=1.0, description="classifier-free guidance at realism 1 (1 = off)")
    conditioning_scale: float = Field(1.0, ge=0, description="ControlNet residual scale at realism 1")
    negative_prompt: str = Field(NEGATIVE_PROMPT, description="negative prompt of classifier-free guidance")
    prompt: str = Field("", description="caption used when the captions stage is off or gives none")
    scheduler: str = Field("DDIMScheduler", description=f"diffusers scheduler class: {', '.join(SCHEDULERS)}")
    tile_size: int = Field(64, ge=8, description="diffusion tile side in latent px (x8 = output px); multiple of 8")
    tile_overlap: int = Field(16, ge=0, description="overlap of neighbouring diffusion tiles in latent px")
    tile_batch: int = Field(8, ge=1, description="tiles per model call (x2 with guidance)")
    vae_tile_size: int | None = Field(None, ge=8, description="VAE encode/decode tile in latent px (default tile_size)")
    realism: float = Field(
        0.5, ge=0.0, le=1.0, description="0 faithful (close to the bicubic input) .. 1 generative (more detail)"
    )
    color_fix: Literal["none", "wavelet", "adain"] = Field("wavelet", description="colour correction toward the input")
    seed: int = Field(0, description="base seed; each image's noise comes from (seed, relative path)")
    skip_existing: bool = Field(True, description="skip inputs whose output already exists (resume after a crash)")
    visual_tokens: Literal["tile", "image"] = Field(
        "tile", description="CLIP/DINOv2 tokens per tile (its LR crop) or of the whole image (the embeddings stage)"
    )
    stages: list[Literal["captions", "grounding", "embeddings"]] | None = Field(
        None, description="annotation stages to run before diffusion (default: those installed and enabled)"
    )
    diffuse: DiffusePoolConfig = Field(default_factory=DiffusePoolConfig)
    read_num_cpus: float = Field(0.25, gt=0, description="CPUs per read/write task")
    max_input_pixels: int = Field(16_777_216, ge=1, description="reject inputs with more pixels (before decoding)")
    min_input_size: int = Field(8, ge=1, description="reject inputs whose short side is smaller")

    @model_validator(mode="after")
    def _check(self) -> UpscaleConfig:
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"upscale.scheduler={self.scheduler!r} is not supported; use one of {', '.join(SCHEDULERS)}")
        for name in ("tile_size", "vae_tile_size"):
            value = getattr(self, name)
            if value is not None and value % 8:
                raise ValueError(f"upscale.{name}={value} must be a multiple of 8 latent px (UNet downsampling)")
        if self.tile_overlap >= self.tile_size:
            raise ValueError(
                f"upscale.tile_overlap={self.tile_overlap} must be smaller than upscale.tile_size={self.tile_size}"
            )
        if self.stages and "embeddings" in self.stages and self.visual_tokens == "tile":
            raise ValueError(
                "upscale.stages has embeddings, whose whole-image tokens only upscale.visual_tokens=image uses "
                "(with 'tile' the diffusion stage encodes each tile's crop): set one or drop the other"
            )
        if self.tile_overlap >= (self.vae_tile_size or self.tile_size):
            raise ValueError(f"upscale.tile_overlap={self.tile_overlap} must be smaller than upscale.vae_tile_size")
        return self

    @property
    def effective_vae_tile(self) -> int:
        return self.vae_tile_size or self.tile_size
