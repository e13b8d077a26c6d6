"""Config sections of the Spatial-Semantic ControlNet (``model``) and its training losses (``loss``).

`spasem.config` composes them into the one tree. The model section holds everything that shapes
the network (so it is also written into the exported controlnet's ``config.json``); the loss section
holds only the weights of the terms, so changing them never changes a checkpoint's layout.
See docs/model.md.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class StreamDropoutConfig(_Section):
    """Probability of dropping each conditioning stream of a training sample (classifier-free guidance).

    A dropped caption becomes the empty prompt's states, dropped grounding becomes GLIGEN's learned
    null boxes, dropped visual tokens become zeros. Each stream is dropped independently.
    """

    text_high: float = Field(0.1, ge=0, le=1, description="drop the high-level caption (CFG's unconditional stream)")
    text_low: float = Field(0.1, ge=0, le=1, description="drop the low-level (quality) caption")
    grounding: float = Field(0.1, ge=0, le=1, description="drop all grounding boxes of a sample")
    visual: float = Field(0.1, ge=0, le=1, description="drop the LR CLIP/DINOv2 tokens")


class ModelConfig(_Section):
    fusion: Literal["gated", "attention", "sfa"] = Field(
        "gated", description="fuse the parallel streams by zero-init tanh gates, a fusion attention with "
        "semantic queries, or XPSR's semantic-fusion attention between the two caption levels (sfa)"
    )
    attention: Literal["standard", "lgcaa"] = Field(
        "standard", description="self-attention of the ControlNet blocks: standard, or + local-global (LGCAA)"
    )
    dfc: Literal["xpsr", "x0"] = Field(
        "xpsr", description="degradation-free constraint: XPSR's conv heads on the ControlNet's encoder features "
        "and residuals (xpsr), or L1 pyramids on the predicted x0 (x0, no heads)"
    )
    max_boxes: int = Field(8, ge=1, le=64, description="grounding boxes per sample (GLIGEN tokens)")
    dropout: StreamDropoutConfig = Field(default_factory=StreamDropoutConfig)
    original_image_ratio: float = Field(
        0.1, ge=0, le=1,
        description="XPSR's original_image_ratio: share of training samples conditioned on the HR itself "
                    "(ControlNet input, visual tokens) with the HR's quality caption; needs shards "
                    "annotated with annotate.captions.low_hr (older samples keep their LR)",
    )
    conditioning_channels: list[int] = Field(
        default_factory=lambda: [16, 32, 96, 256],
        description="widths of the ControlNet's LR-image encoder (len 4 -> downsamples x8, the VAE's factor)",
    )
    restorer_layers: int = Field(2, ge=0, le=12, description="transformer layers of the semantic restorer")
    restorer_mlp_ratio: float = Field(2.0, gt=0, description="MLP width / token width in the restorer")
    fourier_freqs: int = Field(8, ge=1, le=64, description="Fourier frequencies per box coordinate (GLIGEN)")
    lgcaa_window: int = Field(8, ge=1, description="LGCAA local window side, in latent pixels")
    lgcaa_clamp: float = Field(1e4, gt=0, description="LGCAA clamps global-attention values to +-this")
    gradient_checkpointing: bool = Field(False, description="recompute ControlNet activations in backward")

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if len(self.conditioning_channels) < 2:
            raise ValueError(
                f"model.conditioning_channels={self.conditioning_channels} needs at least 2 widths "
                "(len 4 matches the VAE's x8 downsampling)"
            )
        return self

    def controlnet_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of ``SpatialSemanticControlNet.from_unet`` this section sets."""
        return {
            "fusion": self.fusion,
            "attention": self.attention,
            "max_boxes": self.max_boxes,
            "conditioning_channels": tuple(self.conditioning_channels),
            "restorer_layers": self.restorer_layers,
            "restorer_mlp_ratio": self.restorer_mlp_ratio,
            "fourier_freqs": self.fourier_freqs,
            "lgcaa_window": self.lgcaa_window,
            "lgcaa_clamp": self.lgcaa_clamp,
            "dfc": self.dfc,
        }


class LossConfig(_Section):
    """Weights of the training objective's terms; a weight of 0 switches a term off (and its cost)."""

    diffusion: float = Field(1.0, ge=0, description="epsilon / v MSE; the target follows the scheduler's prediction_type")
    degradation_free: float = Field(
        0.05, ge=0, description="weight of each degradation-free term (model.dfc: xpsr = XPSR's lambda_d on "
        "each head's L1, summed; x0 = the L1 pyramids of the predicted x0)"
    )
    degradation_free_scales: int = Field(3, ge=1, le=6, description="pyramid levels of the constraint (model.dfc: x0)")
    degradation_free_pixels: bool = Field(
        True, description="include the pixel pyramid, decoding the predicted x0 through the frozen VAE (model.dfc: x0)"
    )
    semantic: float = Field(0.1, ge=0, description="restored LR CLIP/DINOv2 pooled features vs the HR ones")
    pixel_w1: float = Field(0.0, ge=0, description="DPACM's Wasserstein-1 of pixel distributions (off by default)")

    def needs_pixels(self, dfc: str) -> bool:
        """Whether the objective must decode the predicted x0 to pixels, with ``model.dfc`` = ``dfc``."""
        return (dfc == "x0" and self.degradation_free > 0 and self.degradation_free_pixels) or self.pixel_w1 > 0
