"""The optional ``llava-torch`` caption backend (the original LLaVA code base), behind the caption interface.

Not an extra of this project: llava-torch pins torch 2.0.1 and transformers 4.36, so it needs an environment
of its own (a venv or a Ray ``runtime_env``); never imported unless
``annotate.captions.backend=llava_torch``. It loads the original (non ``-hf``) LLaVA checkpoints such
as ``liuhaotian/llava-v1.5-7b`` and decodes greedily with the ``llava_v1`` conversation template.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

INSTALL_HINT = (
    "annotate.captions.backend=llava_torch needs the optional 'llava-torch' package, which pins torch 2.0.1: "
    "install it in an environment of its own (or set annotate.captions.backend=transformers, the default)"
)


def _import_llava():
    try:
        from llava.constants import DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX
        from llava.conversation import conv_templates
        from llava.mm_utils import get_model_name_from_path, process_images, tokenizer_image_token
        from llava.model.builder import load_pretrained_model
    except ImportError as exc:
        raise ImportError(f"{INSTALL_HINT} ({exc})") from None
    return {
        "DEFAULT_IMAGE_TOKEN": DEFAULT_IMAGE_TOKEN,
        "IMAGE_TOKEN_INDEX": IMAGE_TOKEN_INDEX,
        "conv_templates": conv_templates,
        "get_model_name_from_path": get_model_name_from_path,
        "process_images": process_images,
        "tokenizer_image_token": tokenizer_image_token,
        "load_pretrained_model": load_pretrained_model,
    }


class LlavaTorch:
    """Greedy LLaVA captions through ``llava-torch``; one prompt, a batch of images, left-padded."""

    def __init__(self, path: str, device: str, dtype: torch.dtype, max_new_tokens: int):
        self.llava = _import_llava()
        name = self.llava["get_model_name_from_path"](path)
        self.tokenizer, self.model, self.image_processor, _ = self.llava["load_pretrained_model"](
            path, None, name, device_map=None, device=device, torch_dtype=dtype
        )
        self.model.eval()
        self.max_new_tokens = max_new_tokens

    def _prompt(self, prompt: str) -> str:
        conv = self.llava["conv_templates"]["llava_v1"].copy()
        conv.append_message(conv.roles[0], self.llava["DEFAULT_IMAGE_TOKEN"] + "\n" + prompt)
        conv.append_message(conv.roles[1], None)
        return conv.get_prompt()

    def caption(self, images: list[np.ndarray], prompts: Sequence[str]) -> list[list[str]]:
        return [self._caption(images, p) for p in prompts]

    @torch.no_grad()
    def _caption(self, images: list[np.ndarray], prompt: str) -> list[str]:
        from PIL import Image

        pil = [Image.fromarray(np.asarray(im, np.uint8)) for im in images]
        pixels = self.llava["process_images"](pil, self.image_processor, self.model.config)
        pixels = pixels.to(self.model.device, self.model.dtype)
        ids = self.llava["tokenizer_image_token"](
            self._prompt(prompt), self.tokenizer, self.llava["IMAGE_TOKEN_INDEX"], return_tensors="pt"
        )
        # one prompt for every image: identical lengths, so no padding is needed at all
        input_ids = ids.unsqueeze(0).repeat(len(images), 1).to(self.model.device)
        out = self.model.generate(
            input_ids, images=pixels, image_sizes=[im.size for im in pil], do_sample=False, num_beams=1,
            max_new_tokens=self.max_new_tokens, use_cache=True,
        )
        return [" ".join(s.split()) for s in self.tokenizer.batch_decode(out, skip_special_tokens=True)]
