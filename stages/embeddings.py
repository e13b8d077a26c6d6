"""Embeddings stage: CLIP and DINOv2 features, the semantic-enhanced visual guidance of the model.

LR: the token features (``clip_lr`` ``[Tc, Dc]``, ``dino_lr`` ``[Td, Dd]``), the restorer's input.
HR (only when the batch has ``hr``): the pooled features (``clip_hr`` ``[Dc]``, ``dino_hr`` ``[Dd]``),
the targets of the semantic degradation constraint. Stored fp16, as DESIGN.md's shard table says.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from spasem.columns import take_rows
from spasem.config.annotate import ModelsConfig, StagePoolConfig
from spasem.encoders import ImageEncoders, torch_dtype
from stages.annotations import AnnotationStage


def _fp16(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy().astype(np.float16)


class Embedder(AnnotationStage):
    """Adds ``clip_lr``, ``dino_lr`` (fp16 tokens) and, with ``hr``, ``clip_hr``, ``dino_hr`` (fp16 pooled)."""

    name = "embeddings"

    def __init__(self, section: StagePoolConfig, models: ModelsConfig, paths: dict[str, str]):
        super().__init__(section.batch_size)
        self.encoders = ImageEncoders.load(paths["clip_vision"], paths["dinov2"], models.device,
                                           torch_dtype(models.dtype))
        # output shapes for rows that are not processed: the encoders resize, so one probe fixes them
        # (probed before compiling, so the compiled encoders never specialize on a batch of one)
        probe = self.encoders.encode(np.zeros((1, 32, 32, 3), np.uint8))
        self.shapes = {k: tuple(v.shape[1:]) for k, v in probe.items()}
        if section.compile:
            self.encoders.clip = torch.compile(self.encoders.clip)
            self.encoders.dino = torch.compile(self.encoders.dino)

    def process(self, batch: dict[str, Any], rows: list[int]) -> list[dict[str, Any]]:
        images = list(take_rows(batch["lr"], rows))
        if "hr" in batch:  # one pass per encoder for LR and HR: the transforms resize both to one size
            images += list(take_rows(batch["hr"], rows))
        feats = self.encoders.encode(images)
        n = len(rows)
        # one device-to-host copy per output, not one per row
        clip_lr, dino_lr = _fp16(feats["clip_tokens"][:n]), _fp16(feats["dino_tokens"][:n])
        out = [{"clip_lr": clip_lr[k], "dino_lr": dino_lr[k]} for k in range(n)]
        if "hr" in batch:
            clip_hr, dino_hr = _fp16(feats["clip_pooled"][n:]), _fp16(feats["dino_pooled"][n:])
            for k, row in enumerate(out):
                row.update(clip_hr=clip_hr[k], dino_hr=dino_hr[k])
        return out

    def placeholder(self, batch: dict[str, Any], row: int) -> dict[str, Any]:
        out = {"clip_lr": np.zeros(self.shapes["clip_tokens"], np.float16),
               "dino_lr": np.zeros(self.shapes["dino_tokens"], np.float16)}
        if "hr" in batch:
            out.update(clip_hr=np.zeros(self.shapes["clip_pooled"], np.float16),
                       dino_hr=np.zeros(self.shapes["dino_pooled"], np.float16))
        return out
