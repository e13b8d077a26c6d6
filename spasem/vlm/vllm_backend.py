"""Optional caption backend: LLaVA-1.5 served by vLLM (``annotate.captions.backend: vllm``).

vLLM schedules all (image, prompt) requests of a call with continuous batching and caches the KV of
shared prefixes: the prompts about one image share its "USER: <image>...<image>\\n" prefix (~580 of
~610 tokens), so each further prompt costs only its own tokens, as ``share_prefix`` does for the
transformers backend. Same prompts (the checkpoint's chat template, rendered by its processor
exactly as :class:`spasem.vlm.llava.TransformersLlava` renders them), greedy decoding
(temperature 0, one sample), the same whitespace normalization of the answers, so the two backends
differ only by numerics.

vLLM pins its own torch, so it is never installed beside this project's: install the ``vllm`` extra
in an environment of its own, or let Ray build one per actor from :data:`RUNTIME_ENV` (the captions
pool passes it as ``runtime_env``; :mod:`stages.captions_vllm` does the same for ``ray.data.llm``).
Nothing here imports vllm until a backend is built, so the request and parsing code below is
tested on any machine.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

# what a Ray actor needs to run this backend: vLLM and its own torch in a per-actor virtualenv
RUNTIME_ENV: dict[str, Any] = {"pip": ["vllm>=0.10"]}
INSTALL_HINT = (
    "annotate.captions.backend=vllm needs vLLM, which pins its own torch: install the project's 'vllm' extra "
    "in an environment of its own, or run the captions pool with runtime_env "
    f"{RUNTIME_ENV} (Ray builds it per actor); the default backend is 'transformers'"
)
# LLaVA-1.5's conversation ("llava-hf" chat template): used when the checkpoint carries no template
LLAVA15_FORMAT = "USER: <image>\n{prompt} ASSISTANT:"
# prompt tokens (~610 with the image) plus the answer, rounded up: the KV budget vLLM reserves per sequence
MAX_MODEL_LEN = 1024


# XPSR's caption scripts write the prompt out in full (utils_data/highlevel_prompt_train.py and
# highlevel_prompt_test.py): the image first, then the turn, and a space and newline before the answer
XPSR_FORMAT = "<image>\nUSER: {prompt} \nASSISTANT:"
TEMPLATES = ("xpsr", "chat")


def chat_prompt(prompt: str, processor: Any | None = None, template: str = "chat") -> str:
    """The text the model receives for one prompt (``annotate.captions.template``): ``xpsr``, XPSR's own
    format; ``chat``, the processor's chat template, else LLaVA-1.5's format. Every backend renders
    its prompts here (the transformers one too), so they all send the same text."""
    if template not in TEMPLATES:
        raise ValueError(f"annotate.captions.template={template!r} is not known; use one of {', '.join(TEMPLATES)}")
    if template == "xpsr":
        return XPSR_FORMAT.format(prompt=prompt)
    if processor is not None and getattr(processor, "chat_template", None):
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return processor.apply_chat_template(conversation, add_generation_prompt=True)
    return LLAVA15_FORMAT.format(prompt=prompt)


def sampling_params(max_new_tokens: int) -> dict[str, Any]:
    """vLLM ``SamplingParams`` of greedy decoding, as transformers' ``do_sample=False, num_beams=1``."""
    return {"n": 1, "temperature": 0.0, "top_p": 1.0, "max_tokens": int(max_new_tokens),
            "skip_special_tokens": True, "detokenize": True}


def engine_kwargs(dtype: Any, max_new_tokens: int, seed: int = 0) -> dict[str, Any]:
    """``vllm.LLM`` / ``vLLMEngineProcessorConfig.engine_kwargs``: prefix caching, one image per prompt."""
    dtype = str(dtype).removeprefix("torch.")  # models.dtype or the torch dtype the stage resolved
    names = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16", "bf16": "bfloat16",
             "fp16": "float16", "fp32": "float32"}
    if dtype not in names:
        raise ValueError(f"models.dtype={dtype!r} is not one vLLM serves; use bfloat16, float16 or float32")
    return {"dtype": names[dtype], "enable_prefix_caching": True, "limit_mm_per_prompt": {"image": 1},
            "max_model_len": max(MAX_MODEL_LEN, 640 + int(max_new_tokens)), "seed": seed}


def build_requests(images: Sequence[np.ndarray], texts: Sequence[str]) -> list[dict[str, Any]]:
    """One vLLM prompt per (prompt, image), prompt-major as the transformers backend orders its rows."""
    from PIL import Image

    pictures = [Image.fromarray(np.asarray(im, np.uint8)) for im in images]
    return [{"prompt": text, "multi_modal_data": {"image": picture}} for text in texts for picture in pictures]


def clean(text: str) -> str:
    """An answer as stored: whitespace runs folded, ends stripped (as the transformers backend does)."""
    return " ".join(str(text).split())


def parse_outputs(texts: Sequence[str], n_images: int, n_prompts: int) -> list[list[str]]:
    """Prompt-major generated texts -> for each prompt, one cleaned answer per image."""
    if len(texts) != n_images * n_prompts:
        raise RuntimeError(f"vLLM returned {len(texts)} answers for {n_images} images x {n_prompts} prompts")
    return [[clean(t) for t in texts[k * n_images : (k + 1) * n_images]] for k in range(n_prompts)]


def _import_vllm():
    try:
        import vllm
    except ImportError as exc:
        raise ImportError(f"{INSTALL_HINT} ({exc})") from None
    return vllm


class VllmLlava:
    """LLaVA through an in-process ``vllm.LLM`` engine (one per captions actor), behind the caption interface."""

    def __init__(self, path: str, device: str, dtype: Any, max_new_tokens: int, template: str = "chat"):
        if not str(device).startswith("cuda"):
            raise ValueError(f"annotate.captions.backend=vllm runs on a GPU; models.device={device!r}: set "
                             "models.device=cuda or use the transformers backend")
        vllm = _import_vllm()
        from transformers import AutoProcessor

        self.processor = AutoProcessor.from_pretrained(path)  # its chat template: the same prompts as transformers
        self.llm = vllm.LLM(model=path, **engine_kwargs(dtype, max_new_tokens))
        self.params = vllm.SamplingParams(**sampling_params(max_new_tokens))
        self.template = template

    def caption(self, images: list[np.ndarray], prompts: Sequence[str]) -> list[list[str]]:
        """Greedy answers: for each prompt, one per image (all requests of the call scheduled together)."""
        return self.caption_groups([(images, prompts)])[0]

    def caption_groups(self, groups: Sequence[tuple[list[np.ndarray], Sequence[str]]]) -> list[list[list[str]]]:
        """:meth:`caption` of each ``(images, prompts)`` group, all in one ``generate``: the engine schedules
        a micro-batch's HR and LR requests together, and its prefix cache serves each image's prompts."""
        requests = [build_requests(images, [chat_prompt(p, self.processor, self.template) for p in prompts])
                    for images, prompts in groups]
        outputs = self.llm.generate([r for group in requests for r in group], self.params, use_tqdm=False)
        texts, out = [o.outputs[0].text for o in outputs], []  # in request order
        for (images, prompts), group in zip(groups, requests, strict=True):
            out.append(parse_outputs(texts[: len(group)], len(images), len(prompts)))
            texts = texts[len(group) :]
        return out
