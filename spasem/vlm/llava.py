"""The default caption backend: LLaVA through transformers, all prompts about an image in one greedy ``generate``.

``AutoProcessor`` applies the checkpoint's chat template and expands ``<image>`` into the vision
tokens; ``LlavaForConditionalGeneration`` generates. All (prompt, image) pairs of a micro-batch decode
together: decoding reads every weight once per step whatever the batch, so twice the rows cost far
less than twice the calls.

The prompts (high-level caption, quality caption, object list) share everything up to the end of the
image ("USER: <image>...<image>\\n"), about 580 of LLaVA-1.5's ~610 prompt tokens. With
``share_prefix`` (the default) that prefix, the vision tower included, runs once per image; its KV
cache is tiled over the prompts, and each row continues with its own prompt tokens, padded in the
middle (masked, positions from the mask, as left padding is). A further prompt about the same image
then costs only its own tokens and its answer; with two prompts this halves the prefill, which is
most of the time at large batches on a GPU.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from spasem.preprocess import ImageTransform
from spasem.vlm.vllm_backend import chat_prompt


def common_prefix_length(sequences: Sequence[torch.Tensor]) -> int:
    """Length of the longest common prefix of 1-D token tensors."""
    n = min(len(s) for s in sequences)
    for i in range(n):
        if any(int(s[i]) != int(sequences[0][i]) for s in sequences[1:]):
            return i
    return n


def left_pad(sequences: Sequence[torch.Tensor], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D token tensors -> ``input_ids`` and ``attention_mask`` ``[N, longest]``, padded on the left as the
    processor pads for generation."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for row, seq in enumerate(sequences):
        input_ids[row, width - len(seq) :] = seq
        mask[row, width - len(seq) :] = 1
    return input_ids, mask


class TransformersLlava:
    """LLaVA through transformers; ``compile`` uses a static KV cache so generate compiles the decoding step."""

    def __init__(self, path: str, device: str, dtype: torch.dtype, max_new_tokens: int, compile: bool = False,
                 share_prefix: bool = True, template: str = "chat"):
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        self.processor = AutoProcessor.from_pretrained(path)
        self.processor.tokenizer.padding_side = "left"  # decoder-only generation continues on the right
        self.model = LlavaForConditionalGeneration.from_pretrained(path, dtype=dtype).to(device).eval()
        self.max_new_tokens = max_new_tokens
        self.template = template
        self.compile = compile
        self.share_prefix = share_prefix
        self.pad = self.processor.tokenizer.pad_token_id
        self.image_token = self.model.config.image_token_index
        # the shared-prefix path preprocesses in torch on the model's device (use_processors: the processor)
        try:
            self.transform = ImageTransform.from_processor(self.processor.image_processor)
        except ValueError:  # an image processor the torch transforms do not reproduce runs itself
            self.transform = None
        self.use_processors = False
        self._texts: dict[str, str] = {}
        self._ids: dict[tuple[str, tuple[int, ...]], torch.Tensor] = {}

    def prompt_text(self, prompt: str) -> str:
        """The prompt as the model receives it: XPSR's format or the checkpoint's chat template
        (``template``; rendered once per prompt: Jinja is slow)."""
        if prompt not in self._texts:
            self._texts[prompt] = chat_prompt(prompt, self.processor, self.template)
        return self._texts[prompt]

    def prompt_ids(self, text: str, image: np.ndarray) -> torch.Tensor:
        """Token ids of a rendered prompt with its image tokens expanded, once per (prompt, image size): the
        count of image tokens depends on the image's size after the processor, never on its pixels."""
        key = (text, tuple(np.shape(image)))
        if key not in self._ids:
            self._ids[key] = self.processor(images=[image], text=[text], return_tensors="pt")["input_ids"][0]
        return self._ids[key]

    def caption(self, images: list[np.ndarray], prompts: Sequence[str]) -> list[list[str]]:
        """Greedy captions: for each prompt, one per image."""
        images = list(images)
        texts = [self.prompt_text(p) for p in prompts]
        if self.share_prefix and len(prompts) > 1:
            ids = [self.prompt_ids(t, images[0]) for t in texts]
            prefix = common_prefix_length(ids)
            if prefix and all(self.image_token not in s[prefix:] for s in ids):
                return self._split(self._shared(images, ids, prefix), len(images), len(prompts))
        return self._split(self._joint(images, texts), len(images), len(prompts))

    @staticmethod
    def _split(decoded: list[str], n: int, p: int) -> list[list[str]]:
        return [decoded[k * n : (k + 1) * n] for k in range(p)]

    def _generate(self, **kwargs) -> list[str]:
        width = kwargs["input_ids"].shape[1]
        extra = {} if "past_key_values" in kwargs or not self.compile else {"cache_implementation": "static"}
        out = self.model.generate(**kwargs, **extra, max_new_tokens=self.max_new_tokens, do_sample=False,
                                  num_beams=1, pad_token_id=self.pad)
        return [" ".join(s.split()) for s in self.processor.batch_decode(out[:, width:], skip_special_tokens=True)]

    @torch.no_grad()
    def _joint(self, images: list[np.ndarray], texts: list[str]) -> list[str]:
        """Every (prompt, image) pair as its own left-padded row."""
        if self.use_processors or self.transform is None or len({np.shape(im) for im in images}) > 1:
            rows = [t for t in texts for _ in images]
            inputs = self.processor(images=images * len(texts), text=rows, padding=True, return_tensors="pt")
            inputs = inputs.to(self.model.device)
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
            return self._generate(**inputs)
        # the processor's rows, built from the cached ids and the torch transform (each image transformed once)
        ids = [self.prompt_ids(t, images[0]) for t in texts for _ in images]
        input_ids, mask = left_pad(ids, self.pad)
        pixels = self.transform(images, self.model.device, self.model.dtype)["pixel_values"]
        return self._generate(input_ids=input_ids.to(self.model.device), attention_mask=mask.to(self.model.device),
                              pixel_values=pixels.repeat(len(texts), 1, 1, 1))

    @torch.no_grad()
    def _shared(self, images: list[np.ndarray], ids: list[torch.Tensor], prefix: int) -> list[str]:
        if self.use_processors or self.transform is None:
            pixels = self.processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
        else:
            pixels = self.transform(images, self.model.device, self.model.dtype)["pixel_values"]
        new = generate_shared_prefix(self.model, pixels, ids, prefix, self.pad, self.max_new_tokens, self.compile)
        return [" ".join(s.split()) for s in self.processor.batch_decode(new, skip_special_tokens=True)]


@torch.no_grad()
def generate_shared_prefix(model, pixel_values: torch.Tensor, ids: list[torch.Tensor], prefix: int, pad: int,
                           max_new_tokens: int, compile: bool = False, **generate_kwargs) -> torch.Tensor:
    """Greedy tokens ``[P*N, new]`` for N images x P prompts whose token ids share their first ``prefix`` tokens.

    The prefix (image included) runs once per image; its KV cache is tiled over the prompts; each row
    continues with its prompt's own tokens after masked padding in the middle. Rows are prompt-major.
    """
    from transformers import DynamicCache, StaticCache

    device, n, p = model.device, pixel_values.shape[0], len(ids)
    head = ids[0][:prefix].to(device)
    out = model(input_ids=head.repeat(n, 1), pixel_values=pixel_values.to(device, model.dtype), use_cache=True,
                logits_to_keep=1)
    width = prefix + max(len(s) - prefix for s in ids)
    input_ids = torch.full((p * n, width), pad, dtype=torch.long, device=device)
    mask = torch.zeros_like(input_ids)
    input_ids[:, :prefix], mask[:, :prefix] = head, 1
    for k, seq in enumerate(ids):  # each prompt's own tokens end every row: padding sits in the middle
        tail = seq[prefix:].to(device)
        input_ids[k * n : (k + 1) * n, width - len(tail) :] = tail
        mask[k * n : (k + 1) * n, width - len(tail) :] = 1
    cache = (StaticCache(config=model.config, max_cache_len=width + max_new_tokens)
             if compile else DynamicCache(config=model.config))
    layers = out.past_key_values.layers
    del out
    for i, layer in enumerate(layers):
        cache.update(layer.keys.repeat(p, 1, 1, 1), layer.values.repeat(p, 1, 1, 1), i)
        layer.keys = layer.values = None  # free the prefix as it is copied: the tiled cache is p times larger
    tokens = model.generate(input_ids=input_ids, attention_mask=mask, past_key_values=cache, do_sample=False,
                            num_beams=1, max_new_tokens=max_new_tokens, pad_token_id=pad, **generate_kwargs)
    return tokens[:, width:]
