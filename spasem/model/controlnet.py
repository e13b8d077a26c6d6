"""``SpatialSemanticControlNet``: a diffusers ControlNet with spatial-grounded textual and
semantic-enhanced visual guidance (SpaSemSR), loadable with ``from_pretrained`` like any diffusers model.

Structure: ``branch`` is a plain ``ControlNetModel`` (copied from the base UNet as
``ControlNetModel.from_unet`` does) whose transformer blocks carry the processors of
``spasem.model.attention``; ``position_net`` (GLIGEN) turns boxes + phrase embeddings into grounding
tokens; ``clip_restorer`` / ``dino_restorer`` turn LR CLIP / DINOv2 tokens into restored pooled
features (for the semantic constraint) and visual tokens. All new outputs start at zero.

With ``dfc="xpsr"``, ``dfc_heads`` are XPSR's degradation-free-constraint heads (qyp2000/XPSR
``models/xpsr/controlnet.py``): ``to_rgbs`` after each stride-2 conv (+ SiLU) of the LR-image encoder, a
``Conv2d(C, 3, 3, padding=1)`` compared with the HR pixels, and ``conv_degradation`` /
``conv_degradation_mid``, a ``Conv2d(C, 4, 3, padding=1)`` on every down residual and the mid residual
*after* the zero-initialized 1x1 ``controlnet_block`` and before ``conditioning_scale``, compared with
the HR latents. They keep PyTorch's default init as in XPSR (not zero): they are side outputs, nothing
of theirs reaches the UNet, so the untrained model is unchanged. ``forward(return_dfc=False)`` (inference)
does not compute them. Their losses are ``training.losses.xpsr_dfc_terms``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import ControlNetModel, UNet2DConditionModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.controlnets.controlnet import ControlNetConditioningEmbedding
from diffusers.models.embeddings import GLIGENTextBoundingboxProjection
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn

from spasem.model.attention import Streams, copy_fusion_weights, install_processors, is_new_layer
from spasem.model.restorer import SemanticRestorer


def branch_config(branch: ControlNetModel) -> dict[str, Any]:
    """A ``ControlNetModel``'s init arguments as JSON-ready values (what ``controlnet=`` takes)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in branch.config.items() if not k.startswith("_")}


class ConditioningEncoder(ControlNetConditioningEmbedding):
    """diffusers' ControlNet conditioning embedding (same layers, same state-dict keys, same output),
    run block by block so that the features after each stride-2 conv can be kept for XPSR's RGB heads.

    ``keep_features`` is set by the caller for one forward pass; the features are then in ``features``.
    """

    def __init__(self, conditioning_embedding_channels: int, conditioning_channels: int = 3,
                 block_out_channels: tuple[int, ...] = (16, 32, 96, 256)):
        super().__init__(conditioning_embedding_channels, conditioning_channels, tuple(block_out_channels))
        self.keep_features = False
        self.features: list[torch.Tensor] | None = None

    @property
    def feature_channels(self) -> list[int]:
        """Channels of the kept features: the outputs of the stride-2 convs."""
        return [block.out_channels for block in self.blocks[1::2]]

    def forward(self, conditioning: torch.Tensor) -> torch.Tensor:
        embedding = F.silu(self.conv_in(conditioning))
        features = []
        for i, block in enumerate(self.blocks):
            embedding = F.silu(block(embedding))
            if i % 2:  # the stride-2 conv of each pair: where XPSR's to_rgbs read
                features.append(embedding)
        self.features = features if self.keep_features else None
        return self.conv_out(embedding)


class DegradationFreeHeads(nn.Module):
    """XPSR's DFC heads: encoder features -> RGB, and each ControlNet residual -> latent channels."""

    def __init__(self, feature_channels: Sequence[int], residual_channels: Sequence[int], latent_channels: int):
        super().__init__()
        self.rgb = nn.ModuleList(nn.Conv2d(c, 3, kernel_size=3, padding=1) for c in feature_channels)
        self.latent = nn.ModuleList(nn.Conv2d(c, latent_channels, kernel_size=3, padding=1) for c in residual_channels)

    def forward(self, features: Sequence[torch.Tensor], residuals: Sequence[torch.Tensor],
                ) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """(RGB predictions, one per encoder feature; latent predictions, one per residual, mid last)."""
        if len(features) != len(self.rgb) or len(residuals) != len(self.latent):
            raise ValueError(f"DFC heads expect {len(self.rgb)} encoder features and {len(self.latent)} residuals, "
                             f"got {len(features)} and {len(residuals)}")
        rgb = tuple(head(f) for head, f in zip(self.rgb, features, strict=True))
        latent = tuple(head(r) for head, r in zip(self.latent, residuals, strict=True))
        return rgb, latent


def residual_channels(branch: nn.Module) -> list[int]:
    """Channels of a diffusers ControlNet's residuals: every down residual, then the mid one."""
    return [block.out_channels for block in branch.controlnet_down_blocks] + [branch.controlnet_mid_block.out_channels]


@dataclass
class SpatialSemanticControlNetOutput(BaseOutput):
    """Residuals for the frozen UNet, the restored pooled LR features (None without that stream) and,
    with ``return_dfc``, XPSR's DFC predictions (RGB per encoder stage; latents per residual, mid last)."""

    down_block_res_samples: tuple[torch.Tensor, ...]
    mid_block_res_sample: torch.Tensor
    clip_pooled: torch.Tensor | None = None
    dino_pooled: torch.Tensor | None = None
    dfc_rgb: tuple[torch.Tensor, ...] | None = None
    dfc_latent: tuple[torch.Tensor, ...] | None = None


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
        dfc: str = "xpsr",
    ):
        super().__init__()
        if controlnet is None:
            raise ValueError("SpatialSemanticControlNet needs the branch's ControlNetModel config; "
                             "build it with SpatialSemanticControlNet.from_unet(unet, ...)")
        if dfc not in ("xpsr", "x0"):
            raise ValueError(f"dfc must be 'xpsr' (XPSR's heads) or 'x0' (no heads), got {dfc!r}")
        self.branch = ControlNetModel(**controlnet)
        cfg = self.branch.config
        # the same layers under the same names, run so that XPSR's RGB heads can read the stride-2 features
        self.branch.controlnet_cond_embedding = ConditioningEncoder(
            cfg.block_out_channels[0], cfg.conditioning_channels, tuple(cfg.conditioning_embedding_out_channels))
        self.dfc_heads = None
        if dfc == "xpsr":
            self.dfc_heads = DegradationFreeHeads(self.branch.controlnet_cond_embedding.feature_channels,
                                                  residual_channels(self.branch), cfg.in_channels)
        cross = cfg.cross_attention_dim
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
        stray = [k for k in result.missing_keys if not is_new_layer(k)] + list(result.unexpected_keys)
        if stray:
            raise RuntimeError(f"the ControlNet branch does not match ControlNetModel.from_unet: {stray[:5]}")
        if load_weights_from_unet:
            copy_fusion_weights(model.branch)
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
        return_dfc: bool = False,
        return_dict: bool = True,
    ) -> SpatialSemanticControlNetOutput | tuple:
        """Residuals for the UNet from noisy latents, timestep, the LR image upsampled to HR size in
        [-1, 1] and the conditioning streams (high caption states are ``encoder_hidden_states``).
        ``return_dfc`` (training) also runs XPSR's DFC heads; inference leaves them out."""
        if return_dfc and self.dfc_heads is None:
            raise ValueError(f"return_dfc needs XPSR's DFC heads; this model was built with dfc={self.config.dfc!r} "
                             "(build it with dfc='xpsr')")
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
        encoder = self.branch.controlnet_cond_embedding
        encoder.keep_features = return_dfc
        try:
            # scale 1: XPSR's heads read the unscaled residuals; diffusers' scaling is this same product
            down, mid = self.branch(
                sample.to(dtype), timestep, encoder_hidden_states=encoder_hidden_states.to(dtype),
                controlnet_cond=controlnet_cond.to(dtype), conditioning_scale=1.0,
                cross_attention_kwargs={"streams": streams}, return_dict=False,
            )
        finally:
            encoder.keep_features = False
        features, encoder.features = encoder.features, None
        dfc_rgb = dfc_latent = None
        if return_dfc:
            dfc_rgb, dfc_latent = self.dfc_heads(features, [*down, mid])
        if conditioning_scale != 1.0:
            down, mid = [r * conditioning_scale for r in down], mid * conditioning_scale
        if not return_dict:
            return down, mid, clip_pooled, dino_pooled, dfc_rgb, dfc_latent
        return SpatialSemanticControlNetOutput(tuple(down), mid, clip_pooled, dino_pooled, dfc_rgb, dfc_latent)


def controlled_unet(unet: UNet2DConditionModel, controlnet: SpatialSemanticControlNet, sample: torch.Tensor,
                    timestep: torch.Tensor | float | int, control_image: torch.Tensor, text_high: torch.Tensor,
                    conditioning_scale: float = 1.0, return_dfc: bool = False, **streams: Any,
                    ) -> tuple[torch.Tensor, SpatialSemanticControlNetOutput]:
    """The frozen UNet's prediction with the ControlNet's residuals added, and the ControlNet's output.

    ``streams`` are the ControlNet's conditioning keywords (``text_low``, ``boxes``, ``phrase_embeds``,
    ``box_mask``, ``clip_tokens``, ``dino_tokens``). Training and sampling both call this, so the two
    can never wire the residuals differently; training sets ``return_dfc`` for XPSR's DFC heads.
    """
    ctrl = controlnet(sample, timestep, control_image, text_high, conditioning_scale=conditioning_scale,
                      return_dfc=return_dfc, **streams)
    udt = unet.dtype
    pred = unet(
        sample.to(udt), timestep, encoder_hidden_states=text_high.to(udt),
        down_block_additional_residuals=[r.to(udt) for r in ctrl.down_block_res_samples],
        mid_block_additional_residual=ctrl.mid_block_res_sample.to(udt),
    ).sample
    return pred, ctrl
