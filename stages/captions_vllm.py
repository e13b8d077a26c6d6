"""Captions through ``ray.data.llm``: a vLLM engine pool in its own runtime_env, one row per (image, prompt).

Where :class:`spasem.vlm.vllm_backend.VllmLlava` runs an engine inside each captions actor, this
builds Ray Data's own LLM processor (``vLLMEngineProcessorConfig`` + ``build_processor``): Ray sizes
the engine pool, feeds it rows as they stream, and installs vLLM per actor from ``RUNTIME_ENV`` (vLLM
pins its own torch). The rows carry the prompt text already rendered by the checkpoint's chat
template and the image; ray.data.llm's chat-template, tokenize and detokenize stages are off
because vLLM tokenizes the prompt itself and returns text. Requests are greedy and prefix-cached,
with the same prompts and cleaning as the other backends (:mod:`spasem.vlm.vllm_backend`).

:func:`prompt_rows` expands image rows into request rows, the prompts of the other backends
each with its image (:func:`stages.captions.caption_asks`), and :func:`caption_columns` folds the
answers back per key into the captions stage's columns (the objects answer parsed into the phrases
grounding queries), so only keys and text move after the engine, never pixels.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from spasem.columns import object_array
from spasem.config.annotate import CaptionsConfig, ModelsConfig
from spasem.vlm.vllm_backend import RUNTIME_ENV, chat_prompt, clean, engine_kwargs, sampling_params
from stages.captions import asked_columns, caption_asks, caption_row, empty_row


def prompt_rows(batch: dict[str, Any], section: CaptionsConfig, render: Callable[[str], str] = chat_prompt
                ) -> list[dict[str, Any]]:
    """One request row per (row, prompt) of a batch with ``key``, ``lr`` and maybe ``hr``: ``key``, ``answer``
    (the output column), ``prompt`` (through ``render``; the default is LLaVA-1.5's format, prepare
    passes the texts of ``annotate.captions.template``) and ``image``.

    The prompts and their images are :func:`stages.captions.caption_asks`' (the two XPSR prompts on the
    images ``high_on`` / ``low_on`` pick, the objects prompt on the LR), as the other backends ask them.
    A row's requests are adjacent, those about one image next to each other, so a batch of the engine
    holds an image's prompts together and its prefix cache serves them.
    """
    asks = caption_asks(section, "hr" in batch)
    rendered = {prompt: render(prompt) for pairs in asks.values() for _, prompt in pairs}
    return [{"key": str(key), "answer": name, "prompt": rendered[prompt], "image": np.asarray(batch[column][i], np.uint8)}
            for i, key in enumerate(batch["key"]) for column, pairs in asks.items() for name, prompt in pairs]


def collect_answers(rows: Sequence[dict[str, Any]], names: Sequence[str], keys: Sequence[str] = ()
                    ) -> dict[str, dict[str, str]]:
    """Answer rows (``key``, ``answer``, ``text``, in any order) -> key -> {column: cleaned text}.

    A key (of those seen, and of ``keys``) missing an answer is an error naming it: a request was lost.
    """
    out: dict[str, dict[str, str]] = {str(k): {} for k in keys}
    for row in rows:
        out.setdefault(str(row["key"]), {})[str(row["answer"])] = clean(row["text"])
    for key, answers in out.items():
        missing = [n for n in names if n not in answers]
        if missing:
            raise RuntimeError(f"vLLM captions: key {key!r} has no answer for {missing}")
    return out


def caption_columns(rows: Sequence[dict[str, Any]], section: CaptionsConfig, keys: Sequence[str]
                    ) -> dict[str, np.ndarray]:
    """Answer rows -> the captions stage's columns for ``keys``, in order: ``caption_high``, ``caption_low``
    (and ``caption_low_hr`` when asked: the ``caption.json`` member) and ``objects`` (the phrases the
    grounding stage queries)."""
    answers = collect_answers(rows, asked_columns(section, True), keys)
    out = [caption_row(answers[str(key)], section.max_objects) for key in keys]
    return {name: object_array([row[name] for row in out]) for name in empty_row(section, True)}


def _preprocess(max_new_tokens: int):
    params = sampling_params(max_new_tokens)

    def preprocess(row: dict[str, Any]) -> dict[str, Any]:
        from PIL import Image

        return {"key": row["key"], "answer": row["answer"], "prompt": row["prompt"],
                "multimodal_data": {"image": Image.fromarray(np.asarray(row["image"], np.uint8))},
                "sampling_params": params}

    return preprocess


def _postprocess(row: dict[str, Any]) -> dict[str, Any]:
    return {"key": row["key"], "answer": row["answer"], "text": row["generated_text"]}


def processor_config(section: CaptionsConfig, models: ModelsConfig, path: str) -> dict[str, Any]:
    """Arguments of ``vLLMEngineProcessorConfig``: the captions pool's size and batch, vLLM in its own env."""
    return {
        "model_source": path,
        "engine_kwargs": engine_kwargs(models.dtype, section.max_new_tokens),
        "runtime_env": RUNTIME_ENV,
        "batch_size": section.batch_size,
        "concurrency": section.pool_size,
        "chat_template_stage": False,  # prompts arrive rendered by the checkpoint's own template
        "tokenize_stage": False,
        "detokenize_stage": False,
    }


def build_caption_processor(section: CaptionsConfig, models: ModelsConfig, path: str):
    """The ``ray.data.llm`` processor: request rows (:func:`prompt_rows`) in, ``key``/``answer``/``text`` out
    (:func:`caption_columns` turns them into the captions stage's columns)."""
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    config = vLLMEngineProcessorConfig(**processor_config(section, models, path))
    return build_processor(config, preprocess=_preprocess(section.max_new_tokens), postprocess=_postprocess)
