"""Frozen-encoder helpers shared by the annotation stages, training's online fallback and upscale.

Everything here loads by path with transformers / diffusers ``from_pretrained``, so the tiny profile
and real weights go through the same code. Outputs follow the shard table of DESIGN.md: text states
``[B, 77, D]``, CLIP / DINOv2 tokens and pooled features, VAE posterior ``[B, 2C, h, w]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from spasem.pixels import hwc_to_signed, to_signed
from spasem.preprocess import ImageBatch, ImageTransform

TEXT_LENGTH = 77


def torch_dtype(name: str | torch.dtype) -> torch.dtype:
    """``"float32" | "bfloat16" | "float16"`` (or a dtype) -> torch dtype, with a clear error."""
    if isinstance(name, torch.dtype):
        return name
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if name not in table:
        raise ValueError(f"unknown dtype {name!r}; use one of float32, bfloat16, float16")
    return table[name]


def load_text_encoder(sd_path: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """The SD base's tokenizer and frozen CLIP text encoder (``sd_path/tokenizer``, ``sd_path/text_encoder``)."""
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(sd_path, subfolder="tokenizer")
    encoder = CLIPTextModel.from_pretrained(sd_path, subfolder="text_encoder", dtype=dtype)
    encoder.to(device).eval().requires_grad_(False)
    return tokenizer, encoder


def _tokens(tokenizer, texts: list[str], device: torch.device) -> torch.Tensor:
    ids = tokenizer(texts, padding="max_length", max_length=TEXT_LENGTH, truncation=True, return_tensors="pt")
    return ids.input_ids.to(device)


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompts: Sequence[str]) -> torch.Tensor:
    """Last hidden states of ``prompts`` padded to 77 tokens: ``[B, 77, D]`` (as SD conditions its UNet)."""
    device = text_encoder.device
    if not len(prompts):
        return torch.zeros(0, TEXT_LENGTH, text_encoder.config.hidden_size, device=device, dtype=text_encoder.dtype)
    return text_encoder(_tokens(tokenizer, [str(p) for p in prompts], device))[0]


@torch.no_grad()
def encode_phrases(tokenizer, text_encoder, phrases: Sequence[Sequence[str]], max_boxes: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled text embeddings of each row's phrases, zero-padded to ``max_boxes``: ``[B, K, D]``, mask ``[B, K]``.

    Phrases past ``max_boxes`` are dropped (boxes are ranked by score, so the best ones stay).
    """
    device, dtype = text_encoder.device, text_encoder.dtype
    dim = text_encoder.config.hidden_size
    out = torch.zeros(len(phrases), max_boxes, dim, device=device, dtype=dtype)
    mask = torch.zeros(len(phrases), max_boxes, device=device, dtype=dtype)
    flat = [(b, k, str(p)) for b, row in enumerate(phrases) for k, p in enumerate(list(row)[:max_boxes])]
    if flat:
        pooled = text_encoder(_tokens(tokenizer, [p for _, _, p in flat], device)).pooler_output
        rows = torch.tensor([b for b, _, _ in flat], device=device)
        cols = torch.tensor([k for _, k, _ in flat], device=device)
        out[rows, cols] = pooled.to(dtype)
        mask[rows, cols] = 1
    return out, mask


def _image_list(images: np.ndarray | Sequence[np.ndarray]) -> list[np.ndarray]:
    if isinstance(images, np.ndarray):
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected uint8 images [B, H, W, 3], got shape {images.shape}")
    return [np.ascontiguousarray(im, dtype=np.uint8) for im in images]


@dataclass
class ImageEncoders:
    """Frozen CLIP vision and DINOv2 encoders with their image processors.

    Images are resized, cropped and normalized in torch on the encoders' device from uint8
    (:mod:`spasem.preprocess`, within 2 uint8 levels of the processors); ``use_processors`` runs
    transformers' own processors on the CPU instead (the reference the benchmark compares against).
    """

    clip: Any
    clip_processor: Any
    dino: Any
    dino_processor: Any
    use_processors: bool = False

    def __post_init__(self):
        # a processor the torch transforms do not reproduce keeps running itself (None: use it)
        self.transforms = {}
        for name in ("clip", "dino"):
            try:
                self.transforms[name] = ImageTransform.from_processor(getattr(self, f"{name}_processor"))
            except ValueError:
                self.transforms[name] = None

    @classmethod
    def load(cls, clip_path: str, dino_path: str, device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32) -> ImageEncoders:
        """Load both encoders by path or hub id (``CLIPVisionModel`` reads CLIP and CLIP-with-projection checkpoints)."""
        from transformers import AutoImageProcessor, CLIPVisionModel, Dinov2Model

        clip = CLIPVisionModel.from_pretrained(clip_path, dtype=dtype).to(device).eval().requires_grad_(False)
        dino = Dinov2Model.from_pretrained(dino_path, dtype=dtype).to(device).eval().requires_grad_(False)
        return cls(clip, AutoImageProcessor.from_pretrained(clip_path), dino, AutoImageProcessor.from_pretrained(dino_path))

    @property
    def device(self) -> torch.device:
        return self.clip.device

    def pixels(self, name: str, images: np.ndarray | torch.Tensor | Sequence[np.ndarray] | ImageBatch) -> torch.Tensor:
        """``pixel_values`` of encoder ``name`` (``clip`` | ``dino``) for uint8 ``[B,H,W,3]`` images of any sizes
        (an :class:`ImageBatch` only through the torch transforms)."""
        model = getattr(self, name)
        if self.use_processors or self.transforms[name] is None:
            proc = getattr(self, f"{name}_processor")
            ims = [np.asarray(im.cpu() if isinstance(im, torch.Tensor) else im, np.uint8) for im in images]
            return proc(images=ims, return_tensors="pt").pixel_values.to(model.device, model.dtype)
        return self.transforms[name](images, model.device, model.dtype)["pixel_values"]

    @torch.no_grad()
    def encode(self, images: np.ndarray | torch.Tensor | Sequence[np.ndarray]) -> dict[str, torch.Tensor]:
        """uint8 images -> ``clip_tokens [B,Tc,Dc]``, ``clip_pooled [B,Dc]``, ``dino_tokens [B,Td,Dd]``, ``dino_pooled [B,Dd]``.

        ``images``: an array or tensor ``[B,H,W,3]`` (a tensor may already sit on the encoders' device),
        or a list of arrays whose sizes may differ (LR and HR in one pass: both come out at one size).
        """
        if isinstance(images, np.ndarray) and images.ndim == 3:
            images = images[None]
        if not self.use_processors and all(self.transforms.values()):
            # one copy to the device and one resize per size for both encoders (the tiny profile's CLIP and
            # DINOv2 both resize to 32 px)
            images = ImageBatch(images, self.device)
        out = {}
        for name, model in (("clip", self.clip), ("dino", self.dino)):
            result = model(pixel_values=self.pixels(name, images))
            out[f"{name}_tokens"] = result.last_hidden_state
            out[f"{name}_pooled"] = result.pooler_output
        return out


def images_to_tensor(images: np.ndarray | Sequence[np.ndarray], device: str | torch.device = "cpu") -> torch.Tensor:
    """uint8 ``[B,H,W,3]`` -> float ``[B,3,H,W]`` in [-1, 1] on ``device`` (moved as uint8: 4x less over the bus)."""
    batch = images if isinstance(images, np.ndarray) and images.ndim == 4 else np.stack(_image_list(images))
    if torch.device(device).type == "cpu" and batch.dtype == np.uint8:
        return hwc_to_signed(batch)  # a table lookup on the host; an accelerator converts on the device
    # a writable C-contiguous array is used as it is (torch warns on read-only memory, so that is copied)
    return to_signed(torch.from_numpy(np.require(batch, np.uint8, ("C", "W"))).to(device).permute(0, 3, 1, 2))
