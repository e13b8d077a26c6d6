"""The new conditioning layers of the Spatial-Semantic ControlNet and the per-stream CFG dropout.

- Grounding tokens are diffusers' GLIGEN ``GLIGENTextBoundingboxProjection`` (Fourier features of
  each box + its phrase embedding, learned null token for padded boxes), built in ``spasem.model.controlnet``.
- ``SemanticRestorer``: a small transformer over the frozen encoder's LR tokens, identity at
  initialization, whose pooled output is pulled toward the HR features by the semantic degradation
  constraint and whose tokens, projected to the cross-attention width, form the visual stream.
- ``stream_keep_masks``: which samples keep each stream in a training step (classifier-free guidance).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

STREAMS = ("text_high", "text_low", "grounding", "visual")


def _heads_for(dim: int) -> int:
    """Attention heads of width about 64 that divide ``dim`` (1 for tiny widths)."""
    heads = max(1, dim // 64)
    while dim % heads:
        heads -= 1
    return heads


class SemanticRestorer(nn.Module):
    """LR encoder tokens -> restored tokens (identity at init) -> pooled feature and visual-stream tokens."""

    def __init__(self, dim: int, out_dim: int, layers: int = 2, mlp_ratio: float = 2.0):
        super().__init__()
        self.blocks = nn.ModuleList()
        for _ in range(layers):
            block = nn.TransformerEncoderLayer(
                dim, _heads_for(dim), dim_feedforward=max(1, int(dim * mlp_ratio)), dropout=0.0,
                activation="gelu", batch_first=True, norm_first=True,
            )
            # pre-norm residual blocks with zeroed output layers start as the identity: the restorer
            # begins from the LR features themselves and learns only the correction
            for layer in (block.self_attn.out_proj, block.linear2):
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)
            self.blocks.append(block)
        self.pool_norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, out_dim)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, T, dim]`` -> (pooled ``[B, dim]`` from the class token, visual tokens ``[B, T, out_dim]``)."""
        x = tokens
        for block in self.blocks:
            x = block(x)
        return self.pool_norm(x[:, 0]), self.proj(x)


def stream_keep_masks(batch_size: int, probs: Mapping[str, float], generator: torch.Generator | None = None,
                      device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Boolean ``[B]`` per stream: True keeps the stream, False drops it (with ``probs[stream]``)."""
    gen_device = generator.device if generator is not None else "cpu"
    draws = torch.rand(len(STREAMS), batch_size, generator=generator, device=gen_device).to(device)
    return {name: draws[i] >= float(probs.get(name, 0.0)) for i, name in enumerate(STREAMS)}


def apply_keep(x: torch.Tensor, keep: torch.Tensor, replacement: torch.Tensor | float = 0.0) -> torch.Tensor:
    """Rows of ``x`` where ``keep`` is False replaced by ``replacement`` (broadcast over the row)."""
    shape = (-1,) + (1,) * (x.ndim - 1)
    keep = keep.view(shape)
    if not torch.is_tensor(replacement):
        replacement = torch.full_like(x, float(replacement))
    return torch.where(keep, x, replacement.to(x.dtype).expand_as(x))
