"""Config section of ``pipeline.upscale`` (issue 7); `spasem.config` composes it into the one tree.

The defaults (DDIM, realism 0.5, wavelet colour fix) are project choices that no paper reports;
``preset: xpsr`` is XPSR's released sampling (docs/upscale.md says where each value comes from).

Units: ``tile_size``, ``tile_overlap`` and ``vae_tile_size`` are in *latent* pixels; one latent pixel
is ``vae_scale_factor`` (8) output pixels, so the default 64 / 16 means 512-pixel tiles overlapping
by 128 output pixels, Stable Diffusion 1.5's native size. See docs/upscale.md.
"""

from __future__ import annotations

from typing import Any, Literal

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
# the XPSR paper's negative prompt (Sec. 3.6); the project default
NEGATIVE_PROMPT = "blurry, dotted, noise, unclear, low-res, over-smoothed"
# XPSR's released sampling: test.py run with configs/xpsr_test.yaml (qyp2000/XPSR). The yaml's values
# differ from the paper's text (guidance 5.5, the shorter negative prompt); the preset follows the code.
XPSR_SAMPLING: dict[str, Any] = {
    "scheduler": "DDPMScheduler",  # test.py: DDPMScheduler.from_pretrained(SD-1.5, subfolder="scheduler")
    "steps": 20,  # xpsr_test.yaml num_inference_steps
    "guidance_scale": 4.5,  # xpsr_test.yaml guidance_scale (the paper's text says 5.5)
    "conditioning_scale": 1.0,
    "negative_prompt": "blurry, dotted, noise, raster lines, unclear, lowres, over-smoothed.",
    "negative_prompt_low": "high resolution, best quality, clear",  # pipeline_xpsr.py, hard-coded
    "added_prompt": "clean, high-resolution, 8k, high quality, clear text.",  # appended with a space
    "added_noise_level": 800,  # test.py --added_noise_level default (not in the yaml)
    "realism": 1.0,  # all steps from the first timestep, every band from the model
    "lr_latent": "sample",  # pipeline_xpsr.py prepare_latents: vae.encode(image).latent_dist.sample(generator)
    "dtype": "float32",  # xpsr_test.yaml mixed_precision: "no" (test.py: weight_dtype float32)
    "vae_rule": "xpsr",  # test.py: _init_tiled_vae(encoder_tile_size=1024, decoder_tile_size=224), myutils/vaehook.py
    "color_fix": "adain",  # test.py: adain_color_fix on every output
    "tile_size": 320,  # test.py --latent_tiled_size / --latent_tiled_overlap
    "tile_overlap": 8,
    "tile_rule": "xpsr",  # pipeline_xpsr.py: whole up to 320 x 320 latent px, square tiles, Gaussian weights
    "upsample": "pillow",  # test.py: validation_image.resize((w * 4, h * 4)), Pillow's default BICUBIC, uint8
    "adain_rounding": "truncate",  # myutils/wavelet_color_fix.py: ToPILImage(result.clamp(0, 1)) truncates
    "size_rule": "xpsr",  # test.py: a x4 short side under process_size (512) up to it, sides down to multiples of 8
    "process_size": 512,  # xpsr_test.yaml process_size
}
PRESETS: dict[str, dict[str, Any]] = {"xpsr": XPSR_SAMPLING}
# schedulers whose add_noise takes any timestep (alphas_cumprod); the sigma-based ones need the schedule's own
VP_SCHEDULERS = ("DDIMScheduler", "DDPMScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler",
                 "PNDMScheduler")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DiffusePoolConfig(_Section):
    """The diffusion stage's actor pool (the other stages use ``annotate.*``'s pools)."""

    num_gpus: float = Field(0.0, ge=0, description="GPUs per diffusion actor (1 on a GPU cluster)")
    num_cpus: float = Field(0.5, gt=0, description="CPUs per diffusion actor (fractional on small machines)")
    pool_size: int = Field(1, ge=1, description="diffusion actors")
    batch_size: int = Field(1, ge=1, description="images per call; each image is tiled on its own")


class UpscaleConfig(_Section):
    preset: Literal["xpsr"] | None = Field(
        None, description="a paper's sampling (xpsr: XPSR's test.py + xpsr_test.yaml); keys set explicitly win"
    )
    model: str | None = Field(
        None, description="SpatialSemanticSRPipeline folder (a training export); default: untrained tiny-profile build"
    )
    scale: int = Field(4, ge=1, le=16, description="output side / input side")
    steps: int = Field(20, ge=1, description="denoising steps of the full schedule (realism runs a part of them)")
    guidance_scale: float = Field(5.5, ge=1.0, description="classifier-free guidance at realism 1 (1 = off)")
    conditioning_scale: float = Field(1.0, ge=0, description="ControlNet residual scale at realism 1")
    negative_prompt: str = Field(NEGATIVE_PROMPT, description="negative prompt of classifier-free guidance")
    negative_prompt_low: str | None = Field(
        None, description="CFG's unconditional low-level caption (XPSR's); none: the low-level caption is kept"
    )
    prompt: str = Field("", description="caption used when the captions stage is off or gives none")
    added_prompt: str = Field("", description="appended (after a space) to every high-level caption, as XPSR does")
    added_noise_level: int | None = Field(
        None, ge=1, le=999, description="XPSR's second add_noise of the start latent at this timestep; none: off"
    )
    scheduler: str = Field("DDIMScheduler", description=f"diffusers scheduler class: {', '.join(SCHEDULERS)}")
    tile_size: int = Field(64, ge=8, description="diffusion tile side in latent px (x8 = output px); multiple of 8")
    tile_overlap: int = Field(16, ge=0, description="overlap of neighbouring diffusion tiles in latent px")
    tile_batch: int = Field(8, ge=1, description="tiles per model call (x2 with guidance)")
    tile_rule: Literal["spread", "xpsr"] = Field(
        "spread", description="diffusion tiles: spread evenly with raised-cosine ramps, or XPSR's layout and "
                              "Gaussian weights (whole up to tile_size squared in area)"
    )
    vae_tile_size: int | None = Field(None, ge=8, description="VAE encode/decode tile in latent px (default tile_size)")
    vae_rule: Literal["blend", "xpsr"] = Field(
        "blend", description="VAE tiles: vae_tile_size tiles blended by ramps, or XPSR's hook (GroupNorm statistics "
                             "shared across tiles, vae_encoder_tile / vae_decoder_tile, whole below them)"
    )
    vae_encoder_tile: int = Field(1024, ge=8, description="vae_rule=xpsr: encoder tile side in image px (XPSR: 1024)")
    vae_decoder_tile: int = Field(224, ge=8, description="vae_rule=xpsr: decoder tile side in latent px (XPSR: 224)")
    realism: float = Field(
        0.5, ge=0.0, le=1.0,
        description="project heuristic: 0 faithful (close to the bicubic input) .. 1 plain sampling from the noised LR",
    )
    color_fix: Literal["none", "wavelet", "adain"] = Field("wavelet", description="colour correction toward the input")
    adain_rounding: Literal["nearest", "truncate"] = Field(
        "nearest", description="AdaIN's output back to uint8: rounded, or truncated as XPSR's adain_color_fix"
    )
    upsample: Literal["torch", "pillow"] = Field(
        "torch", description="the LR's bicubic upsample the model starts from and is conditioned on: torch's "
                             "(a=-0.75, float, as training) or Pillow's (a=-0.5, uint8, as XPSR's test.py)"
    )
    size_rule: Literal["pad", "xpsr"] = Field(
        "pad", description="the size the model runs at: the output padded to whole latent px (cropped after), or "
                           "XPSR's (short side up to process_size, sides down to multiples of 8; resized back after)"
    )
    process_size: int = Field(512, ge=8, description="size_rule=xpsr: the short side a smaller upsample is resized up to")
    lr_latent: Literal["mean", "sample"] = Field(
        "mean", description="the LR's latent the sampling starts from: the VAE posterior's mean, or a draw from it "
                            "(XPSR's latent_dist.sample, the generator's first draw)"
    )
    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None, description="the diffusion stage's weights dtype; none: models.dtype"
    )
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

    @model_validator(mode="before")
    @classmethod
    def _preset(cls, data: Any) -> Any:
        """Fill the preset's values under the keys the user did not set."""
        if isinstance(data, dict) and data.get("preset") is not None:
            if data["preset"] not in PRESETS:
                raise ValueError(f"upscale.preset={data['preset']!r} is unknown; use one of {', '.join(PRESETS)}")
            data = {**PRESETS[data["preset"]], **data}
        return data

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
        if self.added_noise_level is not None and self.scheduler not in VP_SCHEDULERS:
            raise ValueError(
                f"upscale.added_noise_level needs a scheduler whose add_noise takes any timestep "
                f"({', '.join(VP_SCHEDULERS)}), not {self.scheduler}; unset one of them"
            )
        if self.size_rule == "xpsr" and self.upsample != "pillow":
            raise ValueError("upscale.size_rule=xpsr resizes the upsample as XPSR's test.py does, with Pillow: "
                             "set upscale.upsample=pillow (or size_rule=pad)")
        if self.tile_overlap >= (self.vae_tile_size or self.tile_size):
            raise ValueError(f"upscale.tile_overlap={self.tile_overlap} must be smaller than upscale.vae_tile_size")
        return self

    @property
    def effective_vae_tile(self) -> int:
        return self.vae_tile_size or self.tile_size

    def vae_tiles(self, lat_h: int, lat_w: int) -> tuple[int, int]:
        """(tile, overlap) of the VAE's tile grid over a latent: one tile under vae_rule=xpsr (the hook tiles inside)."""
        if self.vae_rule == "xpsr":
            return max(lat_h, lat_w), 0
        return self.effective_vae_tile, self.tile_overlap
