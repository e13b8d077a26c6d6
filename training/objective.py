"""``SRObjective``: the frozen Stable Diffusion, the frozen encoders and the trainable
Spatial-Semantic ControlNet, composed into one module whose forward returns the weighted losses.

The training runner wraps this module in DeepSpeed and optimizes ``trainable_parameters()``; the
upscale stage and users load what ``export`` writes with ``spasem.model.sr_pipeline.load_sr_pipeline``.
Shard members that are missing from a batch (``text``, ``latent``, ``clip_lr``, ...) are computed
online with ``spasem.encoders``, the code the annotation stages use.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from spasem.config.model import LossConfig, ModelConfig
from spasem.encoders import ImageEncoders, encode_phrases, encode_prompts
from spasem.model.controlnet import SpatialSemanticControlNet, controlled_unet
from spasem.model.latents import decode_latents, sample_posterior, vae_posterior
from spasem.model.restorer import apply_keep, stream_keep_masks
from spasem.model.sr_pipeline import CONTROLNET, SpatialSemanticSRPipeline, build_sr_pipeline
from spasem.pixels import signed_to_hwc
from training import losses

log = logging.getLogger(__name__)


def control_image(lr: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The ControlNet's conditioning image: the LR upsampled (bicubic) to ``size``, in [-1, 1]."""
    return F.interpolate(lr.float(), size=size, mode="bicubic", align_corners=False).clamp(-1, 1)


class SRObjective(nn.Module):
    """Frozen SD + encoders, trainable ``controlnet``; ``forward(batch)`` -> dict of losses."""

    def __init__(self, unet, vae, text_encoder, tokenizer, encoders: ImageEncoders, scheduler,
                 controlnet: SpatialSemanticControlNet, model_cfg: ModelConfig, loss_cfg: LossConfig):
        super().__init__()
        self.unet, self.vae, self.text_encoder = unet, vae, text_encoder
        self.clip_vision, self.dino = encoders.clip, encoders.dino
        self.tokenizer, self.encoders, self.scheduler = tokenizer, encoders, scheduler
        self.controlnet = controlnet
        self.model_cfg, self.loss_cfg = model_cfg, loss_cfg
        for module in (unet, vae, text_encoder, encoders.clip, encoders.dino):
            module.eval().requires_grad_(False)
        self.controlnet.train().requires_grad_(True)
        self._empty_text: torch.Tensor | None = None
        self._warned_no_hr_caption = False

    @classmethod
    def from_paths(cls, paths: Mapping[str, str], model_cfg: ModelConfig, loss_cfg: LossConfig,
                   dtype: torch.dtype = torch.float32) -> SRObjective:
        """Load the frozen parts by path (``sd``, ``clip_vision``, ``dinov2``) and build the ControlNet.

        With ``paths["controlnet"]`` (an exported ``controlnet`` folder) training starts from it instead
        of a fresh ``from_unet`` copy. Frozen parts are loaded in ``dtype``; the ControlNet in float32.
        """
        pipe = build_sr_pipeline(paths, model_cfg, dtype)
        encoders = ImageEncoders(pipe.clip_vision, pipe.clip_processor, pipe.dino, pipe.dino_processor)
        controlnet = pipe.controlnet
        if model_cfg.gradient_checkpointing:
            controlnet.enable_gradient_checkpointing()
        return cls(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, encoders, pipe.scheduler, controlnet,
                   model_cfg, loss_cfg)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The ControlNet branch and the new layers; everything else is frozen."""
        return [p for p in self.controlnet.parameters() if p.requires_grad]

    def train(self, mode: bool = True) -> SRObjective:
        """Only the ControlNet switches mode; the frozen parts stay in eval."""
        self.training = mode
        self.controlnet.train(mode)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.controlnet.parameters()).device

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """The scheduler's cumulative alphas in float32 on the module's device (not a buffer, so that
        DeepSpeed's bf16 cast of the module never rounds them)."""
        return self.scheduler.alphas_cumprod.to(self.device, torch.float32)

    # -- conditioning -------------------------------------------------------------------------------
    def _empty(self, batch_size: int) -> torch.Tensor:
        """States of the empty prompt (what a dropped caption becomes), computed once."""
        if self._empty_text is None or self._empty_text.device != self.device:
            self._empty_text = encode_prompts(self.tokenizer, self.text_encoder, [""]).float()
        return self._empty_text.expand(batch_size, -1, -1)

    def conditioning(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Text states, phrase embeddings, boxes, encoder tokens and HR targets, from the batch or online."""
        dev, k = self.device, self.model_cfg.max_boxes
        hr, lr = batch["hr"].to(dev).float(), batch["lr"].to(dev).float()
        out: dict[str, torch.Tensor] = {}
        if batch.get("text") is not None:
            text = batch["text"].to(dev).float()
            out["text_high"], out["text_low"] = text[:, 0], text[:, 1]
        else:
            out["text_high"] = encode_prompts(self.tokenizer, self.text_encoder, list(batch["caption_high"])).float()
            out["text_low"] = encode_prompts(self.tokenizer, self.text_encoder, list(batch["caption_low"])).float()
        phrase_embeds, phrase_mask = encode_phrases(self.tokenizer, self.text_encoder,
                                                    [list(p) for p in batch["phrases"]], k)
        boxes = batch["boxes"].to(dev).float()[:, :k]
        box_mask = batch["box_mask"].to(dev).float()[:, :k]
        pad = k - boxes.shape[1]
        boxes, box_mask = F.pad(boxes, (0, 0, 0, pad)), F.pad(box_mask, (0, pad))
        out.update(phrase_embeds=phrase_embeds.float(), boxes=boxes, box_mask=box_mask * phrase_mask.float())
        need_lr = batch.get("clip_lr") is None or batch.get("dino_lr") is None
        lr_feats = self.encoders.encode(signed_to_hwc(lr)) if need_lr else {}
        need_hr = batch.get("clip_hr") is None or batch.get("dino_hr") is None
        hr_feats = self.encoders.encode(signed_to_hwc(hr)) if need_hr and self.loss_cfg.semantic > 0 else {}
        for name, online in (("clip_lr", "clip_tokens"), ("dino_lr", "dino_tokens"),
                             ("clip_hr", "clip_pooled"), ("dino_hr", "dino_pooled")):
            value = batch.get(name)
            value = value if value is not None else (lr_feats if name.endswith("lr") else hr_feats).get(online)
            if value is not None:
                out[name] = value.to(dev).float()
        # the HR's quality caption: has_low_hr marks the samples that have one (shards may mix)
        has = batch.get("has_low_hr")
        has = torch.as_tensor(has, device=dev).bool() if has is not None else None
        if has is not None:
            out["has_low_hr"] = has
        if batch.get("text_low_hr") is not None:
            out["text_low_hr"] = batch["text_low_hr"].to(dev).float()
        elif (batch.get("caption_low_hr") is not None and batch.get("text") is None
              and self.model_cfg.original_image_ratio > 0):
            # captions without their states (no encode stage): encoded online with the others; the
            # test is on members, the same on every rank (ZeRO-3 gathers the text encoder collectively)
            out["text_low_hr"] = encode_prompts(self.tokenizer, self.text_encoder, list(batch["caption_low_hr"])).float()
        if batch.get("latent") is not None:
            out["posterior"] = batch["latent"].to(dev).float()
        else:
            out["posterior"] = vae_posterior(self.vae, hr).float()
        return out

    def condition_on_hr(self, cond: dict[str, torch.Tensor], hr: torch.Tensor, control: torch.Tensor,
                        generator: torch.Generator | None) -> torch.Tensor:
        """XPSR's ``original_image_ratio`` (``dataloader/localdataset.py``): each sample, with probability
        ``model.original_image_ratio``, is conditioned on its HR instead of its LR, with the HR's quality
        caption as its low-level text (the high-level caption already describes the HR).

        Here the ControlNet input and the LR's CLIP/DINOv2 tokens (computed online from the HR) are
        replaced; boxes stay, as they locate the same objects. Returns the control images, updates
        ``cond`` in place. Samples without the HR's quality caption (shards annotated before
        ``annotate.captions.low_hr``; ``has_low_hr`` False) keep their LR, with one warning.
        """
        low_hr, has = cond.get("text_low_hr"), cond.get("has_low_hr")
        if (low_hr is None or (has is not None and not bool(has.all()))) and not self._warned_no_hr_caption:
            log.warning("model.original_image_ratio=%s: %s samples have no quality caption of the HR "
                        "(annotate.captions.low_hr), so they keep their LR as the condition",
                        self.model_cfg.original_image_ratio, "all" if low_hr is None else "some")
            self._warned_no_hr_caption = True
        if low_hr is None:
            return control
        gdev = generator.device if generator is not None else self.device
        pick = torch.rand(hr.shape[0], generator=generator, device=gdev).to(self.device) < self.model_cfg.original_image_ratio
        if has is not None:
            pick &= has
        tokens = [name for name in ("clip_lr", "dino_lr") if cond.get(name) is not None]
        # under ZeRO-3 the frozen encoders' weights are partitioned and gathered collectively: every rank
        # runs them every step (on the whole batch), whatever its own draw picked
        every_step = bool(tokens) and any(hasattr(p, "ds_id") for p in self.clip_vision.parameters())
        if not bool(pick.any()) and not every_step:
            return control
        idx = pick.nonzero().squeeze(1)
        cond["text_low"] = torch.where(pick[:, None, None], low_hr, cond["text_low"])
        control = control.clone()
        control[idx] = hr[idx]
        if tokens:
            feats = self.encoders.encode(signed_to_hwc(hr if every_step else hr[idx]))
            for name, online in (("clip_lr", "clip_tokens"), ("dino_lr", "dino_tokens")):
                if name in tokens:
                    hr_tokens = feats[online][idx] if every_step else feats[online]
                    cond[name] = cond[name].clone()
                    cond[name][idx] = hr_tokens.to(cond[name].dtype)
        return control

    # -- the objective ------------------------------------------------------------------------------
    def forward(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Weighted total ``loss``, one entry per enabled term and, with XPSR's DFC, each of its terms
        (``dfc_rgb_i``, ``dfc_latent_i``; their sum is ``degradation_free``), all float32 scalars."""
        dev = self.device
        cond = self.conditioning(batch)
        hr = batch["hr"].to(dev).float()
        lr = batch["lr"].to(dev).float()
        bsz = hr.shape[0]
        gdev = generator.device if generator is not None else dev

        def randn(shape):
            return torch.randn(shape, generator=generator, device=gdev).to(dev)

        posterior = cond["posterior"]
        latents = sample_posterior(self.vae.config, posterior, randn(posterior[:, : posterior.shape[1] // 2].shape))
        noise = randn(latents.shape)
        steps = self.scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, steps, (bsz,), generator=generator, device=gdev).to(dev)
        noisy = self.scheduler.add_noise(latents, noise, timesteps)

        control = control_image(lr, tuple(hr.shape[-2:]))
        if self.training and self.model_cfg.original_image_ratio > 0:
            control = self.condition_on_hr(cond, hr, control, generator)
        text_high, text_low, box_mask = cond["text_high"], cond["text_low"], cond["box_mask"]
        clip_lr, dino_lr = cond.get("clip_lr"), cond.get("dino_lr")
        keep_visual = torch.ones(bsz, dtype=torch.bool, device=dev)
        if self.training:
            keep = stream_keep_masks(bsz, self.model_cfg.dropout.model_dump(), generator, dev)
            empty = self._empty(bsz)
            text_high = apply_keep(text_high, keep["text_high"], empty)
            text_low = apply_keep(text_low, keep["text_low"], empty)
            box_mask = apply_keep(box_mask, keep["grounding"])
            keep_visual = keep["visual"]
            clip_lr = apply_keep(clip_lr, keep_visual) if clip_lr is not None else None
            dino_lr = apply_keep(dino_lr, keep_visual) if dino_lr is not None else None

        cfg, dfc = self.loss_cfg, self.model_cfg.dfc
        xpsr_dfc = dfc == "xpsr" and cfg.degradation_free > 0
        pred, ctrl = controlled_unet(
            self.unet, self.controlnet, noisy, timesteps, control, text_high,
            return_dfc=xpsr_dfc, text_low=text_low, boxes=cond["boxes"], phrase_embeds=cond["phrase_embeds"],
            box_mask=box_mask, clip_tokens=clip_lr, dino_tokens=dino_lr,
        )
        pred = pred.float()

        ptype = self.scheduler.config.prediction_type
        terms: dict[str, torch.Tensor] = {}
        parts: dict[str, torch.Tensor] = {}  # logged one by one, already inside a weighted term
        target = losses.diffusion_target(latents, noise, timesteps, self.alphas_cumprod, ptype)
        terms["diffusion"] = losses.diffusion_loss(pred, target)
        x0 = losses.predicted_x0(noisy, pred, timesteps, self.alphas_cumprod, ptype)
        pixels = None
        if cfg.needs_pixels(dfc):
            pixels = decode_latents(self.vae, x0).float()
        if xpsr_dfc:
            # XPSR: lambda_d on each head's L1, summed = the weight times the sum of the terms
            parts = losses.xpsr_dfc_terms(ctrl.dfc_rgb, ctrl.dfc_latent, hr, latents)
            terms["degradation_free"] = torch.stack(list(parts.values())).sum()
        elif cfg.degradation_free > 0:
            terms["degradation_free"] = losses.degradation_free_loss(
                x0, latents, pixels if cfg.degradation_free_pixels else None, hr, cfg.degradation_free_scales)
        if cfg.semantic > 0:
            pairs = [(ctrl.clip_pooled, cond.get("clip_hr")), (ctrl.dino_pooled, cond.get("dino_hr"))]
            pairs = [(r, t) for r, t in pairs if r is not None and t is not None]
            if pairs:
                terms["semantic"] = losses.semantic_loss([r for r, _ in pairs], [t for _, t in pairs], keep_visual)
        if cfg.pixel_w1 > 0:
            terms["pixel_w1"] = losses.wasserstein1_pixels(pixels, hr)
        weights = {"diffusion": cfg.diffusion, "degradation_free": cfg.degradation_free,
                   "semantic": cfg.semantic, "pixel_w1": cfg.pixel_w1}
        total = sum(weights[name] * value for name, value in terms.items())
        return {"loss": total, **terms, **parts}

    # -- export -------------------------------------------------------------------------------------
    def pipeline(self, controlnet: SpatialSemanticControlNet | None = None) -> SpatialSemanticSRPipeline:
        """The inference pipeline over this objective's modules (``controlnet`` overrides, e.g. EMA weights)."""
        return SpatialSemanticSRPipeline(
            vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer, unet=self.unet,
            controlnet=controlnet if controlnet is not None else self.controlnet, scheduler=self.scheduler,
            clip_vision=self.encoders.clip, clip_processor=self.encoders.clip_processor,
            dino=self.encoders.dino, dino_processor=self.encoders.dino_processor,
        )

    def export(self, path: str, controlnet_state_dict: dict[str, torch.Tensor] | None = None,
               full: bool = False) -> None:
        """Save the trained ControlNet into ``path/controlnet`` (diffusers ``save_pretrained``, safetensors);
        ``full``: the whole ``SpatialSemanticSRPipeline`` instead (model_index.json, the frozen parts too).

        ``controlnet_state_dict`` (e.g. gathered from ZeRO-3 partitions, or EMA weights) replaces the
        live ControlNet weights in the export without touching the training module.
        """
        controlnet = self.controlnet
        if controlnet_state_dict is not None:
            controlnet = SpatialSemanticControlNet.from_config(self.controlnet.config)
            controlnet.load_state_dict(controlnet_state_dict)
        if full:  # save_pretrained writes controlnet/ among the other parts
            self.pipeline(controlnet).save_pretrained(path, safe_serialization=True)
        else:
            controlnet.save_pretrained(str(Path(path, CONTROLNET)), safe_serialization=True)
