"""Image processors on the stage's device: resize, centre crop, rescale, normalize and pad in torch.

transformers' processors without torchvision run on PIL, one image at a time, on the CPU: for a
512 px crop that costs milliseconds per image per encoder, more than the tiny models' forward pass and
a real share of a GPU node's CPU budget. :class:`ImageTransform` reads a processor's settings and
applies the same steps to a batch of uint8 images on the model's device, in the same order and with
the same output sizes as transformers computes them:

- resize with ``antialias=True`` bicubic / bilinear (the kernels PIL uses: a = -0.5 for bicubic),
  rounded and clamped to 0..255 as PIL's 8-bit resize is (on CPU torch resizes uint8 directly);
- centre crop (``top = (H - h) // 2``), rescale and normalize fused into one multiply-add;
- Grounding DINO: pad at the bottom and right to the batch's largest image, with ``pixel_mask``.

Outputs match the PIL processors to within one uint8 level before normalization (the kernels round
differently), that is at most ``1 / (255 * std)`` after it; ``tests/test_preprocess.py`` checks this
against the real processors, with the tiny profile's settings and the real checkpoints' ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

# PIL resampling codes the supported processors use -> torch interpolate modes
_MODES = {2: "bilinear", 3: "bicubic"}
# processor classes whose steps are exactly resize -> [centre crop] -> rescale -> normalize -> [pad]
SUPPORTED = ("CLIPImageProcessor", "BitImageProcessor", "GroundingDinoImageProcessor")


def _get(size: Any, key: str) -> int | None:
    value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
    return int(value) if value else None


def resized_shape(height: int, width: int, shortest: int | None, longest: int | None,
                  exact: tuple[int, int] | None) -> tuple[int, int]:
    """The output (height, width) of transformers' resize for these size settings."""
    if shortest and longest:  # Grounding DINO / DETR: get_size_with_aspect_ratio
        size, raw = shortest, None
        lo, hi = float(min(height, width)), float(max(height, width))
        if hi / lo * size > longest:
            raw = longest * lo / hi
            size = int(round(raw))
        if (height <= width and height == size) or (width <= height and width == size):
            return height, width
        if width < height:
            return (int(raw * height / width) if raw is not None else int(size * height / width)), size
        return size, (int(raw * width / height) if raw is not None else int(size * width / height))
    if shortest:  # CLIP / DINOv2: get_resize_output_image_size(default_to_square=False)
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(shortest * long / short)
        return (new_long, shortest) if width <= height else (shortest, new_long)
    if exact:
        return exact
    raise ValueError("a resize needs shortest_edge (optionally with longest_edge) or height and width")


def resize_uint8(images: torch.Tensor, size: tuple[int, int], mode: str, native: bool | None = None) -> torch.Tensor:
    """uint8-valued ``[B,3,H,W]`` -> ``size`` with PIL's antialiased kernels, rounded to 0..255.

    On CPU torch resizes uint8 directly (its fast path, several times quicker than float); on an
    accelerator it resizes in float and rounds, which gives the same values. ``native`` forces either path.
    """
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    if native if native is not None else images.device.type == "cpu":
        x = images if images.dtype == torch.uint8 else images.round().clamp(0, 255).to(torch.uint8)
        return F.interpolate(x.contiguous(memory_format=torch.channels_last), size=size, mode=mode,
                             antialias=True, align_corners=False)
    # PIL resizes width then height and stores the intermediate as uint8: round between the passes too
    x = images.float()
    for step in ((x.shape[-2], size[1]), size):
        if tuple(x.shape[-2:]) != tuple(step):
            x = F.interpolate(x, size=step, mode=mode, antialias=True, align_corners=False).round_().clamp_(0, 255)
    return x


@dataclass(frozen=True)
class ImageTransform:
    """One image processor's steps, applied in torch to uint8 batches on any device."""

    mode: str = "bicubic"
    shortest_edge: int | None = None
    longest_edge: int | None = None
    size: tuple[int, int] | None = None
    crop: tuple[int, int] | None = None
    scale: float | None = 1 / 255
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    pad: bool = False

    @classmethod
    def from_processor(cls, processor: Any) -> ImageTransform:
        """The transform of a CLIP, DINOv2 (Bit) or Grounding DINO image processor (PIL or fast variant)."""
        kind = type(processor).__name__.removesuffix("Pil").removesuffix("Fast")
        if kind not in SUPPORTED:
            raise ValueError(f"no torch transform for image processor {type(processor).__name__}; supported: "
                             f"{', '.join(SUPPORTED)} (use the processor itself for other models)")
        resample = int(getattr(processor, "resample", 2))
        if getattr(processor, "do_resize", True) and resample not in _MODES:
            raise ValueError(f"{kind}: resample={resample} is not bilinear (2) or bicubic (3)")
        size, crop = processor.size, getattr(processor, "crop_size", None)
        exact = (_get(size, "height"), _get(size, "width"))
        do_norm = bool(getattr(processor, "do_normalize", True))
        return cls(
            mode=_MODES.get(resample, "bilinear"),
            shortest_edge=_get(size, "shortest_edge") if processor.do_resize else None,
            longest_edge=_get(size, "longest_edge") if processor.do_resize else None,
            size=exact if processor.do_resize and all(exact) else None,
            crop=(_get(crop, "height"), _get(crop, "width")) if getattr(processor, "do_center_crop", False) else None,
            scale=float(processor.rescale_factor) if getattr(processor, "do_rescale", True) else None,
            mean=tuple(float(m) for m in processor.image_mean) if do_norm else None,
            std=tuple(float(s) for s in processor.image_std) if do_norm else None,
            pad=bool(getattr(processor, "do_pad", False)) and kind == "GroundingDinoImageProcessor",
        )

    def output_shape(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) of one image after resize (and crop)."""
        if self.crop:
            return self.crop
        if self.shortest_edge or self.size:
            return resized_shape(height, width, self.shortest_edge, self.longest_edge, self.size)
        return height, width

    def __call__(self, images: np.ndarray | torch.Tensor | Sequence[np.ndarray] | ImageBatch,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """uint8 ``[B,H,W,3]`` (array, tensor, list of arrays of any sizes, or an :class:`ImageBatch` shared
        with other transforms) -> ``pixel_values`` on ``device``.

        With ``pad`` (Grounding DINO) also ``pixel_mask`` ``[B,H,W]`` (1 on image, 0 on padding).
        """
        batch = images if isinstance(images, ImageBatch) else ImageBatch(images, device)
        parts: list[tuple[list[int], torch.Tensor]] = []
        for k, (rows, x) in enumerate(batch.groups):
            parts.append((rows, self._apply(batch, k, x, dtype).to(device)))
        n = sum(len(rows) for rows, _ in parts)
        shapes = {tuple(t.shape[-2:]) for _, t in parts}
        if len(parts) == 1:  # one size (the annotate phase's crops): no copy, and no padding to do
            values = parts[0][1]
            if not self.pad:
                return {"pixel_values": values}
            return {"pixel_values": values, "pixel_mask": torch.ones((n, *values.shape[-2:]), dtype=torch.long,
                                                                     device=values.device)}
        if len(shapes) == 1 and not self.pad:
            out = torch.empty((n, *parts[0][1].shape[1:]), dtype=dtype, device=device)
            for rows, t in parts:
                out[rows] = t
            return {"pixel_values": out}
        if not self.pad:
            raise ValueError(f"images of different sizes give outputs of sizes {sorted(shapes)}; "
                             "this processor neither crops nor pads: pass images of one size")
        height, width = max(s[0] for s in shapes), max(s[1] for s in shapes)
        out = torch.zeros((n, 3, height, width), dtype=dtype, device=device)
        mask = torch.zeros((n, height, width), dtype=torch.long, device=device)
        for rows, t in parts:
            h, w = t.shape[-2:]
            out[rows, :, :h, :w] = t
            mask[rows, :h, :w] = 1
        return {"pixel_values": out, "pixel_mask": mask}

    def _apply(self, batch: ImageBatch, k: int, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        height, width = x.shape[-2:]
        if self.shortest_edge or self.size:
            x = batch.resized(k, resized_shape(height, width, self.shortest_edge, self.longest_edge, self.size),
                              self.mode)
        if self.crop:
            x = center_crop(x, self.crop)
        # rescale then normalize, fused: (x * s - m) / d = x * (s / d) - m / d
        scale = torch.full((3,), self.scale or 1.0, device=x.device)
        mean = torch.tensor(self.mean or (0.0, 0.0, 0.0), device=x.device)
        std = torch.tensor(self.std or (1.0, 1.0, 1.0), device=x.device)
        a, b = (scale / std).view(1, 3, 1, 1), (-mean / std).view(1, 3, 1, 1)
        # contiguous while still uint8 (a quarter of the bytes), then in-place float maths: 3x faster on CPU;
        # always on a copy, since the resize may be shared with another transform
        return x.contiguous().to(torch.float32, copy=True).mul_(a).add_(b).to(dtype)


class ImageBatch:
    """uint8 images on a device as ``[b,3,H,W]`` groups of one size each, with the resizes made of them.

    Transforms given the same batch (CLIP and DINOv2 of one micro-batch) copy it to the device once and
    share each resize to a given size and kernel instead of making it again.
    """

    def __init__(self, images: np.ndarray | torch.Tensor | Sequence[np.ndarray], device: str | torch.device = "cpu"):
        # uint8 over the bus: 4x less than float
        self.groups = [(rows, t.to(device, non_blocking=True).permute(0, 3, 1, 2))
                       for rows, t in _same_size_groups(images)]
        self._resized: dict[tuple[int, tuple[int, int], str], torch.Tensor] = {}

    def resized(self, k: int, size: tuple[int, int], mode: str) -> torch.Tensor:
        """Group ``k`` resized to ``size`` with ``mode`` (made once; callers never write to it)."""
        key = (k, tuple(size), mode)
        if key not in self._resized:
            self._resized[key] = resize_uint8(self.groups[k][1], size, mode)
        return self._resized[key]


def center_crop(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """transformers' centre crop of ``[B,C,H,W]``: ``top = (H - h) // 2``, ``left = (W - w) // 2``."""
    height, width = x.shape[-2:]
    h, w = size
    if height < h or width < w:
        raise ValueError(f"centre crop {size} is larger than the resized image {(height, width)}: the processor's "
                         "crop_size must not exceed its size")
    top, left = (height - h) // 2, (width - w) // 2
    return x[..., top : top + h, left : left + w]


def _same_size_groups(images: np.ndarray | torch.Tensor | Sequence[np.ndarray]) -> list[tuple[list[int], torch.Tensor]]:
    """Row indices and stacked uint8 ``[b,H,W,3]`` tensors, one group per image size."""
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
        tensor = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(images))
        _check(tensor)
        return [(list(range(len(tensor))), tensor)]
    by_shape: dict[tuple[int, ...], list[int]] = {}
    arrays = [np.asarray(im) for im in images]
    for i, im in enumerate(arrays):
        by_shape.setdefault(im.shape, []).append(i)
    groups = []
    for rows in by_shape.values():
        tensor = torch.from_numpy(np.stack([arrays[i] for i in rows]))
        _check(tensor)
        groups.append((rows, tensor))
    return groups


def _check(tensor: torch.Tensor) -> None:
    if tensor.dtype != torch.uint8 or tensor.ndim != 4 or tensor.shape[-1] != 3:
        raise ValueError(f"expected uint8 RGB images [B, H, W, 3], got {tuple(tensor.shape)} {tensor.dtype}")
