"""Encode stage: the frozen SD text encoder's states of both captions and the VAE posterior of HR.

``text`` ``[2, 77, D]`` holds the high- and low-level captions' last hidden states (empty strings when
the captions stage is off: the unconditional embedding); ``text_low_hr`` ``[77, D]`` the HR's quality
caption's, when the captions stage asked for it (``annotate.captions.low_hr``). ``latent`` ``[2C, H/8, W/8]`` is the VAE's
posterior (mean, logvar) of the HR crop, only when the batch has ``hr``; training samples from it, so
one shard serves every epoch with fresh latent noise. Both stored fp16.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from spasem.columns import take_rows
from spasem.config.annotate import ModelsConfig, StagePoolConfig
from spasem.encoders import encode_prompts, images_to_tensor, load_text_encoder, torch_dtype
from spasem.model.latents import vae_posterior
from stages.annotations import AnnotationStage


class Encoder(AnnotationStage):
    """Adds ``text`` (fp16 ``[2,77,D]``), ``text_low_hr`` (fp16 ``[77,D]``) with ``caption_low_hr`` and,
    with ``hr``, ``latent`` (fp16 ``[2C,h,w]``)."""

    name = "encode"

    def __init__(self, section: StagePoolConfig, models: ModelsConfig, paths: dict[str, str]):
        from diffusers import AutoencoderKL

        super().__init__(section.batch_size)
        dtype = torch_dtype(models.dtype)
        self.tokenizer, self.text_encoder = load_text_encoder(paths["sd"], models.device, dtype)
        self.vae = AutoencoderKL.from_pretrained(paths["sd"], subfolder="vae", torch_dtype=dtype)
        self.vae.to(models.device).eval().requires_grad_(False)
        if section.compile:
            # channels-last + compile: 1.8x on the VAE encoder at 512 px on an H100 (168 -> 299 images/s)
            self.vae.to(memory_format=torch.channels_last)
            torch.backends.cudnn.benchmark = True  # crops have one size: pick the fastest conv kernels once
            self.vae.encoder = torch.compile(self.vae.encoder)
        # the VAE's device, read once: diffusers' ``vae.device`` walks every submodule for hooks (2 ms a call)
        self.device = next(self.vae.parameters()).device
        self.width = self.text_encoder.config.hidden_size
        self.channels = self.vae.config.latent_channels
        self.factor = 2 ** (len(self.vae.config.block_out_channels) - 1)

    @torch.no_grad()
    def process(self, batch: dict[str, Any], rows: list[int]) -> list[dict[str, Any]]:
        n_rows = len(rows)
        columns = [c for c in ("caption_high", "caption_low", "caption_low_hr") if c in batch]
        prompts = [str(batch[c][i]) for c in columns for i in rows] if columns else [""] * (2 * n_rows)
        states = encode_prompts(self.tokenizer, self.text_encoder, prompts).float().cpu().numpy().astype(np.float16)
        states = states.reshape(-1, n_rows, *states.shape[1:])  # (prompt column, row, 77, D)
        out = [{"text": states[:2, n]} for n in range(n_rows)]
        if "caption_low_hr" in batch:
            for n, row in enumerate(out):
                row["text_low_hr"] = states[2, n]
        if "hr" in batch:
            pixels = images_to_tensor(take_rows(batch["hr"], rows), self.device)
            latent = vae_posterior(self.vae, pixels).float().cpu().numpy().astype(np.float16)
            for n, row in enumerate(out):
                row["latent"] = latent[n]
        return out

    def placeholder(self, batch: dict[str, Any], row: int) -> dict[str, Any]:
        out = {"text": np.zeros((2, 77, self.width), np.float16)}
        if "caption_low_hr" in batch:
            out["text_low_hr"] = np.zeros((77, self.width), np.float16)
        if "hr" in batch:
            h, w = np.asarray(batch["hr"][row]).shape[:2]
            out["latent"] = np.zeros((2 * self.channels, h // self.factor, w // self.factor), np.float16)
        return out
