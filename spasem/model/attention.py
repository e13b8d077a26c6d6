"""Spatial-semantic attention as diffusers attention processors.

The ControlNet branch keeps every attention layer of the UNet it was copied from; these processors
add to them. Each cross-attention (``attn2``) keeps its text cross-attention to the high-level
caption and gains parallel cross-attentions to the low-level caption, the grounding tokens and the
visual tokens, fused by zero-init tanh gates (``gated``) or by a fusion attention whose queries come
from the semantic (visual) stream (``attention``, the project's own). ``sfa`` is XPSR's semantic-fusion
attention as qyp2000/XPSR ``models/xpsr/unet_2d_blocks.py`` writes it (``SemanticFusion``): around every
``Transformer2DModel`` of the branch, a copy of it attends to the low-level caption and a third
transformer takes its queries from the high-level result and its keys/values from the low-level
result; grounding and visual tokens stay gated cross-attentions in ``attn2``. With ``attention:
lgcaa`` each self-attention (``attn1``) gains a local-global context-aware branch. Every new output
starts at zero, so the untrained model is exactly the plain ControlNet.

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
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from torch import nn

_BASE = AttnProcessor2_0()
FUSIONS = ("gated", "attention", "sfa")
# state-dict keys of the layers this module adds to a plain ControlNet (absent from its checkpoints)
NEW_LAYER_KEYS = (".processor.", ".semantic_fusion.")


def is_new_layer(key: str) -> bool:
    """Whether a branch state-dict key belongs to a layer added here (not in ``ControlNetModel``)."""
    return any(part in key for part in NEW_LAYER_KEYS)


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
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
        self.fusion = fusion
        # with sfa the low-level caption goes through SemanticFusion around the whole transformer instead
        self.streams = self.STREAMS[1:] if fusion == "sfa" else self.STREAMS
        self.branches = nn.ModuleDict({
            name: Attention(query_dim, cross_attention_dim=cross_attention_dim, heads=heads, dim_head=dim_head,
                            out_bias=True, processor=AttnProcessor2_0())
            for name in self.streams
        })
        if fusion in ("gated", "sfa"):
            # GLIGEN's gating: tanh(0) = 0 keeps the base output; the gates get gradients from step one
            self.gates = nn.Parameter(torch.zeros(len(self.streams)))
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
        for name in self.streams:
            tokens = getattr(streams, name)
            if tokens is not None:
                results[name] = self.branches[name](hidden_states, encoder_hidden_states=tokens.to(hidden_states.dtype))
        if not results:
            return out
        if self.fusion != "attention":
            gates = torch.tanh(self.gates).to(out.dtype)
            for i, name in enumerate(self.streams):
                if name in results:
                    out = out + gates[i] * results[name]
            return out
        # the project's fusion attention: queries from the semantic stream, keys/values from the textual ones
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
    """Give every transformer block's ``attn1``/``attn2`` of ``model`` the spatial-semantic processors
    and, with ``fusion="sfa"``, every ``Transformer2DModel`` XPSR's semantic fusion."""
    modules = list(model.named_modules())
    if fusion == "sfa":
        for _, module in modules:
            if isinstance(module, Transformer2DModel):
                module.semantic_fusion = SemanticFusion(module)
                module.register_forward_hook(_semantic_fusion_hook, with_kwargs=True)
    for name, module in modules:
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


class SemanticFusion(nn.Module):
    """XPSR's semantic-fusion attention around one ``Transformer2DModel`` T (qyp2000/XPSR
    ``models/xpsr/unet_2d_blocks.py``, ``CrossAttnDownBlock2D`` / ``UNetMidBlock2DCrossAttn``):

        H = T(h, high caption)          the block itself (``attentions``)
        L = low(h, low caption)         a copy of T (``attentions_lowlevel``), run in parallel on h
        out = connect(H, kv = L tokens) a copy of T whose cross-attention reads L (``attentions_connect``)

    ``connect`` is a full transformer (norm, proj_in, self-attn, cross-attn, FF, proj_out, residual H).
    Its ``proj_out`` starts at zero, so ``out = H`` until it moves: the issue asks for zero init, XPSR
    does not zero it (it copies the UNet's weights, see ``copy_fusion_weights``).
    """

    def __init__(self, block: Transformer2DModel):
        super().__init__()
        cfg = {k: v for k, v in block.config.items() if not k.startswith("_")}
        self.low = Transformer2DModel(**cfg)
        # keys/values are the low-level result's spatial tokens: its channels are the cross-attention width
        self.connect = Transformer2DModel(**{**cfg, "cross_attention_dim": cfg["in_channels"]})
        for layer in (*self.low.modules(), *self.connect.modules()):
            if isinstance(layer, Attention):  # plain SDPA: these see no streams, as in XPSR
                layer.set_processor(AttnProcessor2_0())
        _zero(self.connect.proj_out)

    def forward(self, high: torch.Tensor, hidden_states: torch.Tensor, text_low: torch.Tensor,
                attention_mask: torch.Tensor | None = None, encoder_attention_mask: torch.Tensor | None = None,
                ) -> torch.Tensor:
        low = self.low(hidden_states, encoder_hidden_states=text_low, attention_mask=attention_mask,
                       encoder_attention_mask=encoder_attention_mask, return_dict=False)[0]
        tokens = low.flatten(2).transpose(1, 2)  # XPSR: L.view(B, C, -1).permute(0, 2, 1)
        return self.connect(high, encoder_hidden_states=tokens, attention_mask=attention_mask,
                            return_dict=False)[0]


def _zero(module: nn.Module) -> None:
    for p in module.parameters():
        nn.init.zeros_(p)


def _semantic_fusion_hook(block: Transformer2DModel, args: tuple, kwargs: dict, output):
    """Forward hook of a ``Transformer2DModel`` with ``semantic_fusion``: its output H becomes the fused one.

    Without a low-level caption the block's own output stands, as XPSR's blocks fall back to H.
    """
    streams = (kwargs.get("cross_attention_kwargs") or {}).get("streams")
    if streams is None or streams.text_low is None:
        return output
    hidden_states = args[0] if args else kwargs["hidden_states"]
    high = output[0] if isinstance(output, tuple) else output.sample
    fused = block.semantic_fusion(high, hidden_states, streams.text_low.to(high.dtype),
                                  kwargs.get("attention_mask"), kwargs.get("encoder_attention_mask"))
    return (fused,) if isinstance(output, tuple) else Transformer2DModelOutput(sample=fused)


def copy_fusion_weights(model: nn.Module) -> None:
    """Initialize every ``SemanticFusion`` from its block as XPSR's ``from_unet`` does: ``low`` and
    ``connect`` copy the block's weights where the shapes match (``connect``'s ``attn2.to_k``/``to_v``
    read C-wide tokens, not text, and keep their default init); ``connect.proj_out`` stays zero."""
    for module in model.modules():
        fusion = getattr(module, "semantic_fusion", None)
        if not isinstance(fusion, SemanticFusion):
            continue
        source = {k: v for k, v in module.state_dict().items() if not is_new_layer("." + k)}
        for part in (fusion.low, fusion.connect):
            own = part.state_dict()
            part.load_state_dict({k: v for k, v in source.items() if k in own and own[k].shape == v.shape},
                                 strict=False)
        _zero(fusion.connect.proj_out)
