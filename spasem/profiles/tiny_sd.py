"""Tiny random-init Stable Diffusion parts and image encoders for the ``tiny`` profile.

Each builder makes the real model classes from their real config classes with small widths, seeded,
and saves them with ``save_pretrained`` in the layout the real checkpoints use (``sd/unet``,
``sd/vae``, ``sd/text_encoder``, ``sd/tokenizer``, ``sd/scheduler``; an encoder folder with its image
processor), so every stage loads them by path with the code that loads real weights.

The widths are chosen so the pieces fit together as the real ones do: the text encoder's width is the
UNet's cross-attention width, the VAE downsamples by 8 with 4 latent channels.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

TEXT_DIM = 32  # text encoder width == UNet cross-attention width
CLIP_VISION_DIM = 48
DINO_DIM = 40
ENCODER_IMAGE_SIZE = 32  # CLIP/DINOv2 input side in the tiny profile (224 in the real ones)
SEED = 1234


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table (the base of their BPE vocab)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


# a few merges of common letter pairs, so the tokenizer exercises real BPE and words are not all bytes
_MERGES = ["t h", "th e</w>", "i n", "a n", "e r", "o n", "r e", "i s</w>", "a t", "e n", "o f</w>", "an d</w>"]


def build_tokenizer(target: Path) -> int:
    """A real ``CLIPTokenizer`` over a byte-level vocab with a few merges; returns the vocab size."""
    from transformers import CLIPTokenizer

    chars = list(_bytes_to_unicode().values())
    vocab_list = chars + [c + "</w>" for c in chars]
    for merge in _MERGES:
        vocab_list.append(merge.replace(" ", ""))
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}
    target.mkdir(parents=True, exist_ok=True)
    (target / "vocab.json").write_text(json.dumps(vocab))
    (target / "merges.txt").write_text("#version: 0.2\n" + "\n".join(_MERGES) + "\n")
    tok = CLIPTokenizer(str(target / "vocab.json"), str(target / "merges.txt"), model_max_length=77,
                        pad_token="<|endoftext|>")
    tok.save_pretrained(str(target))
    return len(vocab)


def build_sd(target: Path) -> None:
    """UNet, VAE, text encoder, tokenizer and scheduler of a tiny SD in diffusers' folder layout."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from spasem.profiles.real_size import build_from_config

    vocab_size = build_tokenizer(target / "tokenizer")
    torch.manual_seed(SEED)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    unet.save_pretrained(str(target / "unet"))
    torch.manual_seed(SEED + 1)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 16, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=128,
        scaling_factor=0.18215,
    )
    vae.save_pretrained(str(target / "vae"))
    torch.manual_seed(SEED + 2)
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=TEXT_DIM, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=TEXT_DIM,
        bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1,
    ))
    text.save_pretrained(str(target / "text_encoder"))
    # SD 1.5's published noise schedule (configs/models/sd15-scheduler.json)
    build_from_config("sd15-scheduler").save_pretrained(str(target / "scheduler"))


def build_clip_vision(target: Path) -> None:
    """A tiny ``CLIPVisionModelWithProjection`` and its image processor."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(SEED + 3)
    model = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=CLIP_VISION_DIM, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        image_size=ENCODER_IMAGE_SIZE, patch_size=8, projection_dim=CLIP_VISION_DIM,
    ))
    model.save_pretrained(str(target))
    CLIPImageProcessor(
        size={"shortest_edge": ENCODER_IMAGE_SIZE},
        crop_size={"height": ENCODER_IMAGE_SIZE, "width": ENCODER_IMAGE_SIZE},
    ).save_pretrained(str(target))


def build_dinov2(target: Path) -> None:
    """A tiny ``Dinov2Model`` and its image processor (DINOv2's own preprocessing constants)."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    torch.manual_seed(SEED + 4)
    model = Dinov2Model(Dinov2Config(
        hidden_size=DINO_DIM, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2,
        image_size=ENCODER_IMAGE_SIZE, patch_size=8,
    ))
    model.save_pretrained(str(target))
    BitImageProcessor(
        size={"shortest_edge": ENCODER_IMAGE_SIZE},
        crop_size={"height": ENCODER_IMAGE_SIZE, "width": ENCODER_IMAGE_SIZE},
        do_center_crop=True,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    ).save_pretrained(str(target))
