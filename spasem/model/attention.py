"""Spatial-semantic attention as diffusers attention processors.

The ControlNet branch keeps every attention layer of the UNet it was copied from; these processors
add to them. Each cross-attention (``attn2``) keeps its text cross-attention to the high-level
caption and gains parallel cross-attentions to the low-level caption, the grounding tokens and the
visual tokens, fused by zero-init tanh gates (``gated``) or by an XPSR-style fusion attention whose
queries come from the semantic (visual) stream (``attention``). With ``attention: lgcaa`` each
self-attention (``attn1``) gains a local-global context-aware branch. Every new output starts at
zero, so the untrained model is exactly the plain ControlNet.

The streams reach the processors through ``cross_attention_kwargs={"streams": Streams(...)}``, the
path diffusers uses for IP-Adapter's image tokens; a processor called without streams behaves as
``AttnProcessor2_0``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import nn

_BASE = AttnProcessor2_0()


@dataclass
class Streams:
    """The conditioning streams of one forward pass, each ``[B, tokens, cross_dim]`` or None."""

    text_low: torch.Tensor | None = None
    grounding: torch.Tensor | None = None
    visual: torch.Tensor | None = None
    latent_hw: tuple[int, int] | None = None  # (h, w) of the ControlNet's input latents, for LGCAA's windows


def _zero_linear(dim_in: int, dim_out: int) -> nn.Linear:
    layer = nn.Linear(dim_in, dim_out)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class StreamAwareAttnProcessor:
    """``AttnProcessor2_0`` that accepts (and ignores) the streams, for layers without new branches."""

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 streams: Streams | None = None) -> torch.Tensor:
        return _BASE(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


class SpatialSemanticAttnProcessor(nn.Module):
    """Parallel cross-attention to text (high + low), grounding and visual tokens, then fusion."""

    STREAMS = ("text_low", "grounding", "visual")

    def __init__(self, query_dim: int, cross_attention_dim: int, heads: int, dim_head: int, fusion: str = "gated"):
        super().__init__()
        if fusion not in ("gated", "attention"):
            raise ValueError(f"fusion must be 'gated' or 'attention', got {fusion!r}")
        self.fusion = fusion
        self.branches = nn.ModuleDict({
            name: Attention(query_dim, cross_attention_dim=cross_attention_dim, heads=heads, dim_head=dim_head,
                            out_bias=True, processor=AttnProcessor2_0())
            for name in self.STREAMS
        })
        if fusion == "gated":
            # GLIGEN's gating: tanh(0) = 0 keeps the base output; the gates get gradients from step one
            self.gates = nn.Parameter(torch.zeros(len(self.STREAMS)))
        else:
            self.fuse = Attention(query_dim, heads=heads, dim_head=dim_head, processor=AttnProcessor2_0())
            self.fuse_out = _zero_linear(query_dim, query_dim)

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 streams: Streams | None = None) -> torch.Tensor:
        out = _BASE(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        if streams is None:
            return out
        results = {}
        for name in self.STREAMS:
            tokens = getattr(streams, name)
            if tokens is not None:
                results[name] = self.branches[name](hidden_states, encoder_hidden_states=tokens.to(hidden_states.dtype))
        if not results:
            return out
        if self.fusion == "gated":
            gates = torch.tanh(self.gates).to(out.dtype)
            for i, name in enumerate(self.STREAMS):
                if name in results:
                    out = out + gates[i] * results[name]
            return out
        # XPSR's fusion attention: queries from the semantic stream, keys/values from the textual ones
        query = results.get("visual", results.get("grounding", results.get("text_low")))
        context = torch.cat([out] + [results[n] for n in ("text_low", "grounding") if n in results], dim=1)
        return out + self.fuse_out(self.fuse(query, encoder_hidden_states=context))


def _windows(x: torch.Tensor, h: int, w: int, win: int) -> tuple[torch.Tensor, int, int]:
    """``[B, h*w, C]`` -> ``[B * nWin, win*win, C]`` (zero-padded to whole windows), padded h, w."""
    b, _, c = x.shape
    ph, pw = math.ceil(h / win) * win, math.ceil(w / win) * win
    grid = F.pad(x.view(b, h, w, c), (0, 0, 0, pw - w, 0, ph - h))
    grid = grid.view(b, ph // win, win, pw // win, win, c).permute(0, 1, 3, 2, 4, 5)
    return grid.reshape(-1, win * win, c), ph, pw


def _unwindows(x: torch.Tensor, b: int, h: int, w: int, ph: int, pw: int, win: int) -> torch.Tensor:
    c = x.shape[-1]
    grid = x.view(b, ph // win, pw // win, win, win, c).permute(0, 1, 3, 2, 4, 5).reshape(b, ph, pw, c)
    return grid[:, :h, :w].reshape(b, h * w, c)


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, c = x.shape
    return x.view(b, n, heads, c // heads).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


class LGCAAProcessor(nn.Module):
    """Self-attention plus a zero-init local-global context-aware branch (LGCAA).

    Branch: windowed local attention with normalized queries/keys (cosine attention with a learned
    temperature) -> LayerNorm -> projection and global attention over all tokens, values clamped ->
    LayerNorm + MLP (residual) -> zero-init output projection.
    """

    def __init__(self, dim: int, heads: int, window: int = 8, clamp: float = 1e4):
        super().__init__()
        while dim % heads:
            heads -= 1
        self.heads, self.window, self.clamp = heads, window, clamp
        self.norm_in = nn.LayerNorm(dim)
        self.local_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.logit_scale = nn.Parameter(torch.full((heads, 1, 1), math.log(10.0)))
        self.local_norm = nn.LayerNorm(dim)
        self.global_proj = nn.Linear(dim, dim)
        self.global_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.global_norm = nn.LayerNorm(dim)
        self.out_norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.out = _zero_linear(dim, dim)

    def branch(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        b = x.shape[0]
        x = self.norm_in(x)
        win = min(self.window, max(h, w))
        local, ph, pw = _windows(x, h, w, win)
        q, k, v = (_heads(t, self.heads) for t in self.local_qkv(local).chunk(3, dim=-1))
        scale = self.logit_scale.clamp(max=math.log(100.0)).exp().to(q.dtype)
        scores = (F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)) * scale
        local = _merge(scores.softmax(dim=-1) @ v)
        local = self.local_norm(_unwindows(local, b, h, w, ph, pw, win))
        q, k, v = (_heads(t, self.heads) for t in self.global_qkv(self.global_proj(local)).chunk(3, dim=-1))
        glob = _merge(F.scaled_dot_product_attention(q, k, v)).clamp(-self.clamp, self.clamp)
        glob = self.global_norm(torch.nan_to_num(glob))
        return self.out(glob + self.mlp(self.out_norm(glob)))

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 streams: Streams | None = None) -> torch.Tensor:
        out = _BASE(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        if hidden_states.ndim != 3:
            return out
        h, w = _grid(hidden_states.shape[1], streams.latent_hw if streams is not None else None)
        return out + self.branch(hidden_states, h, w)


def _grid(tokens: int, latent_hw: tuple[int, int] | None) -> tuple[int, int]:
    """The (h, w) of a block's token grid: the input latents' grid downsampled by a power of 2."""
    if latent_hw is not None:
        h, w = latent_hw
        while h * w > tokens and h > 1 and w > 1:
            h, w = math.ceil(h / 2), math.ceil(w / 2)
        if h * w == tokens:
            return h, w
    side = math.isqrt(tokens)
    if side * side == tokens:
        return side, side
    raise ValueError(f"cannot recover the token grid of {tokens} tokens from latents {latent_hw}")


def install_processors(model: nn.Module, cross_attention_dim: int, fusion: str, attention: str,
                       lgcaa_window: int = 8, lgcaa_clamp: float = 1e4) -> None:
    """Give every transformer block's ``attn1``/``attn2`` of ``model`` the spatial-semantic processors."""
    for name, module in list(model.named_modules()):
        if not isinstance(module, Attention) or "transformer_blocks" not in name:
            continue
        dim = module.to_q.in_features
        if name.endswith("attn2"):
            module.set_processor(SpatialSemanticAttnProcessor(
                dim, cross_attention_dim, module.heads, module.to_q.out_features // module.heads, fusion))
        elif name.endswith("attn1"):
            if attention == "lgcaa":
                module.set_processor(LGCAAProcessor(dim, module.heads, lgcaa_window, lgcaa_clamp))
            else:
                module.set_processor(StreamAwareAttnProcessor())
