"""Prepare's captions through ``ray.data.llm`` (``annotate.captions.backend: vllm``): a pass per wave before the other stages.

A ``ray.data.llm`` processor takes one request row per (image, prompt) and returns one answer row per
request, in any order and in blocks of its own: it cannot sit in the chain of per-shard stages,
which hand each stage one shard per call. So, for each wave of shards, prepare first streams the
wave's request rows (:func:`stages.captions_vllm.prompt_rows`: the prompts of every backend,
each with its image) through the processor, which sizes its own vLLM engine pool in vLLM's own
runtime_env, and gathers the answers, text only, by key. The chain then starts with
:class:`AnsweredCaptions`, a task that turns each shard's answers into the captions stage's columns
(``caption_high``, ``caption_low``, ``caption_low_hr``, ``objects``) with the cleaning and parsing of every backend, so
``caption.json`` and the markers' model id do not depend on the backend. A key whose answers did not
all come back becomes a reject naming the missing prompts, like any failed row.

Upscale streams images and keeps the engine inside its captions actors (``spasem.vlm.vllm_backend``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from functools import lru_cache
from typing import Any

import numpy as np

from spasem.config import Config
from spasem.config.annotate import CaptionsConfig
from spasem.profiles import resolve_models
from spasem.storage import Store
from spasem.vlm.vllm_backend import chat_prompt
from stages.annotations import AnnotationStage
from stages.captions import Captioner, asked_columns, caption_asks, caption_row
from stages.captions_vllm import build_caption_processor, collect_answers, prompt_rows

log = logging.getLogger(__name__)


def uses_llm_processor(cfg: Config, names: list[str]) -> bool:
    """Whether prepare's captions go through the ``ray.data.llm`` pass (the vLLM backend)."""
    return "captions" in names and cfg.annotate.captions.backend == "vllm"


def _requests(row: dict[str, Any], store: Store, section: CaptionsConfig, texts: dict[str, str]
              ) -> list[dict[str, Any]]:
    """The request rows of one pairs shard (its images decoded here, in a Ray task)."""
    from pipeline.annotate_phase import load_pairs

    return prompt_rows(load_pairs({"shard": np.asarray([row["shard"]])}, store), section, texts.__getitem__)


@lru_cache(maxsize=4)
def rendered_prompts(model: str, prompts: tuple[str, ...], template: str = "chat") -> dict[str, str]:
    """Each prompt as the engine receives it: in XPSR's format (``template: xpsr``), or through the
    checkpoint's chat template (its processor's files, read once on the driver), or LLaVA-1.5's format
    when the driver cannot read them."""
    if template == "xpsr":
        return {prompt: chat_prompt(prompt, None, template) for prompt in prompts}
    try:
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(model)
    except Exception as exc:  # noqa: BLE001 - e.g. a hub id this machine cannot reach
        log.warning("captions by ray.data.llm: no processor for %s here (%s); prompts in LLaVA-1.5's format",
                    model, exc)
        processor = None
    return {prompt: chat_prompt(prompt, processor) for prompt in prompts}


def caption_wave(cfg: Config, pairs: Store, shards: list[int], build: Callable | None = None
                 ) -> tuple[dict[str, dict[str, str]], float]:
    """The answers for every sample of ``shards``: key -> {output column: cleaned text}, and the pass's
    seconds per sample. ``build(section, models, model)`` makes the processor (default: ray.data.llm's)."""
    import ray

    build = build or build_caption_processor
    section = cfg.annotate.captions
    start = time.time()
    requests = ray.data.from_items([{"shard": i} for i in shards], override_num_blocks=len(shards))
    # the model the markers name (model_id): the configured hub id or path, or the tiny profile's LLaVA
    # built here (a path on this node: the engines must run on it, or share models.cache_dir)
    model = resolve_models(cfg.models, ("llava",))["llava"]
    prompts = tuple(dict.fromkeys(p for pairs in caption_asks(section, True).values() for _, p in pairs))
    texts = rendered_prompts(model, prompts, section.template)
    requests = requests.flat_map(_requests, fn_kwargs={"store": pairs, "section": section, "texts": texts},
                                 num_cpus=0.25)
    answers = build(section, cfg.models, model)(requests).select_columns(["key", "answer", "text"])
    found = collect_answers(list(answers.iter_rows()), names=())
    samples = max(1, len(found))
    log.info("captions by ray.data.llm: %d samples of %d shards in %.1f s", len(found), len(shards), time.time() - start)
    return found, (time.time() - start) / samples


class AnsweredCaptions(AnnotationStage):
    """The captions stage's columns from answers gathered before the chain (:func:`caption_wave`)."""

    name = "captions"

    def __init__(self, section: CaptionsConfig, answers: dict[str, dict[str, str]]):
        super().__init__(section.batch_size)
        self.cfg, self.answers = section, answers
        self.names = asked_columns(section, True)  # every prompt about a training sample's HR and LR

    def process(self, batch: dict[str, Any], rows: list[int]) -> list[dict[str, Any]]:
        out = []
        for i in rows:
            got = self.answers.get(str(batch["key"][i]), {})
            missing = [name for name in self.names if name not in got]
            if missing:
                raise RuntimeError(f"vLLM returned no answer for {missing} (a request was lost)")
            out.append(caption_row(got, self.cfg.max_objects))
        return out

    placeholder = Captioner.placeholder  # the same empty columns as the actor stage


def attach_captions(batch: dict[str, np.ndarray], section: CaptionsConfig, answers: dict[str, dict[str, str]],
                    seconds_per_sample: float) -> dict[str, np.ndarray]:
    """A shard's rows with their captions columns; the pass's time per sample as the stage's time."""
    out = AnsweredCaptions(section, answers)(batch)
    out["seconds_captions"] = np.full(len(batch["key"]), seconds_per_sample)
    return out
