"""Captions stage: LLaVA's high-level (content) and low-level (quality) captions, and the objects to ground.

Each prompt is asked about the image XPSR uses for it (``annotate.captions.high_on``, ``low_on``):
in training the high-level caption describes the HR and the quality caption the LR, as XPSR's
``localdataset.py`` pairs them; where there is no HR (upscale, as XPSR's ``test.py``) every prompt
goes to the LR. With ``low_hr`` the quality prompt is also asked about the HR (``caption_low_hr``),
as XPSR's ``lowlevel_prompt_train.py`` captions both images: training conditions a share of samples on
the HR with that caption (``model.original_image_ratio``). The objects prompt (``objects_prompt``) asks
the LR, the image grounding runs on, for its objects as short noun phrases; :func:`spasem.vlm.phrases.parse_objects` turns the answer into
at most ``max_objects`` queries for the grounding stage. Prompts about the same image run in one
call, so the backend shares that image's prefix between them. Generation is batched, left-padded
and greedy, so the same image always gets the same answers.

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
from spasem.vlm.phrases import parse_objects
from stages.annotations import AnnotationStage


class CaptionBackend(Protocol):
    """``caption`` is asked once per image column; a backend may also offer ``caption_groups(groups)``
    (a list of ``(images, prompts)``, answered as a list of ``caption`` results) to take them in one call."""

    def caption(self, images: list[np.ndarray], prompts: Sequence[str]) -> list[list[str]]:
        """Greedy captions: for each prompt, one per image."""


def make_backend(name: str, path: str, device: str, dtype: torch.dtype, max_new_tokens: int,
                 compile: bool = False, template: str = "chat") -> CaptionBackend:
    """The caption backend ``annotate.captions.backend`` names (``template``: the prompts' format; the
    original LLaVA code keeps its own conversation template)."""
    if name == "transformers":
        from spasem.vlm.llava import TransformersLlava

        return TransformersLlava(path, device, dtype, max_new_tokens, compile, template=template)
    if name == "llava_torch":
        from spasem.vlm.llava_torch import LlavaTorch

        return LlavaTorch(path, device, dtype, max_new_tokens)
    if name == "vllm":
        from spasem.vlm.vllm_backend import VllmLlava

        return VllmLlava(path, device, dtype, max_new_tokens, template)
    raise ValueError(f"annotate.captions.backend={name!r} is not known; use 'transformers', 'llava_torch' or 'vllm'")


def caption_asks(section: CaptionsConfig, has_hr: bool) -> dict[str, list[tuple[str, str]]]:
    """Image column (``hr`` | ``lr``) -> the (output column, prompt) pairs asked about it, in asking order.

    ``high_on`` / ``low_on`` pick the image of the two XPSR prompts (``hr`` falls back to ``lr`` without
    an HR, as in upscale); ``low_hr`` asks the quality prompt about the HR too, only where there is one;
    the objects prompt asks the LR, the image grounding runs on. Every backend asks exactly these.
    """
    asks = [("caption_high", section.high_on, section.high_prompt), ("caption_low", section.low_on, section.low_prompt)]
    if section.low_hr and has_hr:
        asks.append(("caption_low_hr", "hr", section.low_prompt))
    if section.max_objects > 0:
        asks.append(("objects", "lr", section.objects_prompt))
    groups: dict[str, list[tuple[str, str]]] = {}
    for name, on, prompt in asks:
        groups.setdefault("hr" if on == "hr" and has_hr else "lr", []).append((name, prompt))
    return groups


def asked_columns(section: CaptionsConfig, has_hr: bool) -> list[str]:
    """The output columns :func:`caption_asks` fills, in asking order."""
    return [name for pairs in caption_asks(section, has_hr).values() for name, _ in pairs]


def empty_row(section: CaptionsConfig, has_hr: bool) -> dict[str, Any]:
    """The captions stage's columns with nothing answered: what a failed row gets, and the column set."""
    return caption_row(dict.fromkeys(asked_columns(section, has_hr), ""), section.max_objects)


def caption_row(answers: dict[str, str], max_objects: int) -> dict[str, Any]:
    """One row's columns from its answers by output name: the captions as they are (``caption_low_hr``
    when it was asked), the objects answer parsed into at most ``max_objects`` phrases (what the
    grounding stage queries)."""
    row = {"caption_high": answers["caption_high"], "caption_low": answers["caption_low"],
           "objects": parse_objects(answers.get("objects", ""), max_objects)}
    if "caption_low_hr" in answers:
        row["caption_low_hr"] = answers["caption_low_hr"]
    return row


class Captioner(AnnotationStage):
    """Adds ``caption_high``, ``caption_low`` (str), ``objects`` (list of str) and, with ``low_hr`` and an
    HR, ``caption_low_hr`` (str) to each row."""

    name = "captions"

    def __init__(self, section: CaptionsConfig, models: ModelsConfig, paths: dict[str, str],
                 backend: CaptionBackend | None = None):
        super().__init__(section.batch_size)
        self.cfg = section
        self.backend = backend or make_backend(
            section.backend, paths["llava"], models.device, torch_dtype(models.dtype), section.max_new_tokens,
            section.compile, section.template,
        )

    def process(self, batch: dict[str, Any], rows: list[int]) -> list[dict[str, Any]]:
        plan = caption_asks(self.cfg, "hr" in batch)
        groups = [([np.asarray(batch[column][i], np.uint8) for i in rows], [prompt for _, prompt in asks])
                  for column, asks in plan.items()]
        # a backend that schedules requests itself (vLLM) takes every image's prompts in one call
        together = getattr(self.backend, "caption_groups", None)
        replies_per_group = together(groups) if together else [self.backend.caption(*group) for group in groups]
        answers: list[dict[str, str]] = [{} for _ in rows]
        for asks, replies in zip(plan.values(), replies_per_group, strict=True):
            for (name, _), reply in zip(asks, replies, strict=True):
                for row, text in zip(answers, reply, strict=True):
                    row[name] = text
        return [caption_row(row, self.cfg.max_objects) for row in answers]

    def placeholder(self, batch: dict[str, Any], row: int) -> dict[str, Any]:
        return empty_row(self.cfg, "hr" in batch)
