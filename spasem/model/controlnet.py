"""``SpatialSemanticControlNet``: a diffusers ControlNet with spatial-grounded textual and
semantic-enhanced visual guidance (SpaSemSR), loadable with ``from_pretrained`` like any diffusers model.

Structure: ``branch`` is a plain ``ControlNetModel`` (copied from the base UNet as
``ControlNetModel.from_unet`` does) whose transformer blocks carry the processors of
``spasem.model.attention``; ``position_net`` (GLIGEN) turns boxes + phrase embeddings into grounding
tokens; ``clip_restorer`` / ``dino_restorer`` turn LR CLIP / DINOv2 tokens into restored pooled
features (for the semantic constraint) and visual tokens. All new outputs start at zero.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import GLIGENTextBoundingboxProjection
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput

from spasem.model.attention import Streams, install_processors
from spasem.model.restorer import SemanticRestorer


def branch_config(branch: ControlNetModel) -> dict[str, Any]:
    """A ``ControlNetModel``'s init arguments as JSON-ready values (what ``controlnet=`` takes)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in branch.config.items() if not k.startswith("_")}


@dataclass
class SpatialSemanticControlNetOutput(BaseOutput):
    """Residuals for the frozen UNet plus the restored pooled LR features (None without that stream)."""

    down_block_res_samples: tuple[torch.Tensor, ...]
    mid_block_res_sample: torch.Tensor
    clip_pooled: torch.Tensor | None = None
    dino_pooled: torch.Tensor | None = None


class SpatialSemanticControlNet(ModelMixin, ConfigMixin):
    """The Spatial-Semantic ControlNet (see the module docstring and docs/model.md)."""

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        controlnet: dict | None = None,
        fusion: str = "gated",
        attention: str = "standard",
        max_boxes: int = 8,
        text_dim: int = 768,
        clip_dim: int = 1024,
        dino_dim: int = 768,
        restorer_layers: int = 2,
        restorer_mlp_ratio: float = 2.0,
        fourier_freqs: int = 8,
        lgcaa_window: int = 8,
        lgcaa_clamp: float = 1e4,
    ):
        super().__init__()
        if controlnet is None:
            raise ValueError("SpatialSemanticControlNet needs the branch's ControlNetModel config; "
                             "build it with SpatialSemanticControlNet.from_unet(unet, ...)")
        self.branch = ControlNetModel(**controlnet)
        cross = self.branch.config.cross_attention_dim
        self.position_net = GLIGENTextBoundingboxProjection(text_dim, cross, "text-only", fourier_freqs)
        self.clip_restorer = SemanticRestorer(clip_dim, cross, restorer_layers, restorer_mlp_ratio)
        self.dino_restorer = SemanticRestorer(dino_dim, cross, restorer_layers, restorer_mlp_ratio)
        install_processors(self.branch, cross, fusion, attention, lgcaa_window, lgcaa_clamp)

    @classmethod
    def from_unet(cls, unet: UNet2DConditionModel, conditioning_channels: tuple[int, ...] = (16, 32, 96, 256),
                  load_weights_from_unet: bool = True, **config: Any) -> SpatialSemanticControlNet:
        """Build from the base UNet's config and copy its encoder weights, as ``ControlNetModel.from_unet``."""
        config.setdefault("text_dim", unet.config.cross_attention_dim)
        # diffusers owns the UNet -> ControlNet mapping (config keys and copied weights): reuse it as is
        branch = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=tuple(conditioning_channels),
                                           load_weights_from_unet=load_weights_from_unet)
        model = cls(controlnet=branch_config(branch), **config)
        result = model.branch.load_state_dict(branch.state_dict(), strict=False)
        stray = [k for k in result.missing_keys if ".processor." not in k] + list(result.unexpected_keys)
        if stray:
            raise RuntimeError(f"the ControlNet branch does not match ControlNetModel.from_unet: {stray[:5]}")
        return model

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        controlnet_cond: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        text_low: torch.Tensor | None = None,
        boxes: torch.Tensor | None = None,
        phrase_embeds: torch.Tensor | None = None,
        box_mask: torch.Tensor | None = None,
        clip_tokens: torch.Tensor | None = None,
        dino_tokens: torch.Tensor | None = None,
        conditioning_scale: float = 1.0,
        return_dict: bool = True,
    ) -> SpatialSemanticControlNetOutput | tuple:
        """Residuals for the UNet from noisy latents, timestep, the LR image upsampled to HR size in
        [-1, 1] and the conditioning streams (high caption states are ``encoder_hidden_states``)."""
        dtype = self.dtype
        grounding = None
        if phrase_embeds is not None:
            if boxes is None or box_mask is None:
                raise ValueError("phrase_embeds need boxes [B, K, 4] and box_mask [B, K]")
            grounding = self.position_net(boxes=boxes.to(dtype), masks=box_mask.to(dtype),
                                          positive_embeddings=phrase_embeds.to(dtype))
        clip_pooled = dino_pooled = None
        visual = []
        if clip_tokens is not None:
            clip_pooled, tokens = self.clip_restorer(clip_tokens.to(dtype))
            visual.append(tokens)
        if dino_tokens is not None:
            dino_pooled, tokens = self.dino_restorer(dino_tokens.to(dtype))
            visual.append(tokens)
        streams = Streams(
            text_low=text_low.to(dtype) if text_low is not None else None,
            grounding=grounding,
            visual=torch.cat(visual, dim=1) if visual else None,
            latent_hw=tuple(sample.shape[-2:]),
        )
        down, mid = self.branch(
            sample.to(dtype), timestep, encoder_hidden_states=encoder_hidden_states.to(dtype),
            controlnet_cond=controlnet_cond.to(dtype), conditioning_scale=conditioning_scale,
            cross_attention_kwargs={"streams": streams}, return_dict=False,
        )
        if not return_dict:
            return down, mid, clip_pooled, dino_pooled
        return SpatialSemanticControlNetOutput(tuple(down), mid, clip_pooled, dino_pooled)


def controlled_unet(unet: UNet2DConditionModel, controlnet: SpatialSemanticControlNet, sample: torch.Tensor,
                    timestep: torch.Tensor | float | int, control_image: torch.Tensor, text_high: torch.Tensor,
                    conditioning_scale: float = 1.0, **streams: Any,
                    ) -> tuple[torch.Tensor, SpatialSemanticControlNetOutput]:
    """The frozen UNet's prediction with the ControlNet's residuals added, and the ControlNet's output.

    ``streams`` are the ControlNet's conditioning keywords (``text_low``, ``boxes``, ``phrase_embeds``,
    ``box_mask``, ``clip_tokens``, ``dino_tokens``). Training and sampling both call this, so the two
    can never wire the residuals differently.
    """
    ctrl = controlnet(sample, timestep, control_image, text_high, conditioning_scale=conditioning_scale, **streams)
    udt = unet.dtype
    pred = unet(
        sample.to(udt), timestep, encoder_hidden_states=text_high.to(udt),
        down_block_additional_residuals=[r.to(udt) for r in ctrl.down_block_res_samples],
        mid_block_additional_residual=ctrl.mid_block_res_sample.to(udt),
    ).sample
    return pred, ctrl
