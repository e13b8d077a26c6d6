"""Captions stage: LLaVA's high-level (content) and low-level (quality) captions, and the objects to ground.

As in XPSR, both prompts are asked about the LR image (``annotate.captions.on``). Generation is
batched, left-padded and greedy, so the same image always gets the same caption. The objects are the
noun phrases of the high-level caption (:func:`stages.annotations.extract_objects`), capped at
``annotate.captions.max_objects``; they become the grounding stage's queries.

Backends sit behind :class:`CaptionBackend`: ``transformers`` (``LlavaForConditionalGeneration``, the
default) or ``llava_torch`` (the original LLaVA code, the optional ``llava`` extra).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import torch

from spasem.config.annotate import CaptionsConfig, ModelsConfig
from spasem.encoders import torch_dtype
from stages.annotations import AnnotationStage, extract_objects


class CaptionBackend(Protocol):
    def caption(self, images: list[np.ndarray], prompts: Sequence[str]) -> list[list[str]]:
        """Greedy captions: for each prompt, one per image."""


def make_backend(name: str, path: str, device: str, dtype: torch.dtype, max_new_tokens: int,
                 compile: bool = False) -> CaptionBackend:
    """The caption backend ``annotate.captions.backend`` names."""
    if name == "transformers":
        from spasem.vlm.llava import TransformersLlava

        return TransformersLlava(path, device, dtype, max_new_tokens, compile)
    if name == "llava_torch":
        from spasem.vlm.llava_torch import LlavaTorch

        return LlavaTorch(path, device, dtype, max_new_tokens)
    raise ValueError(f"annotate.captions.backend={name!r} is not known; use 'transformers' or 'llava_torch'")


class Captioner(AnnotationStage):
    """Adds ``caption_high``, ``caption_low`` (str) and ``objects`` (list of str) to each row."""

    name = "captions"

    def __init__(self, section: CaptionsConfig, models: ModelsConfig, paths: dict[str, str],
                 backend: CaptionBackend | None = None):
        super().__init__(section.batch_size)
        self.cfg = section
        self.backend = backend or make_backend(
            section.backend, paths["llava"], models.device, torch_dtype(models.dtype), section.max_new_tokens,
            section.compile,
        )

    def process(self, batch: dict[str, Any], rows: list[int]) -> list[dict[str, Any]]:
        column = "hr" if self.cfg.on == "hr" and "hr" in batch else "lr"
        images = [np.asarray(batch[column][i], np.uint8) for i in rows]
        high, low = self.backend.caption(images, [self.cfg.high_prompt, self.cfg.low_prompt])
        return [
            {"caption_high": h, "caption_low": lo, "objects": extract_objects(h, self.cfg.max_objects)}
            for h, lo in zip(high, low, strict=True)
        ]

    def placeholder(self, batch: dict[str, Any], row: int) -> dict[str, Any]:
        return {"caption_high": "", "caption_low": "", "objects": []}
