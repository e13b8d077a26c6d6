"""stages/features.py: the frozen-encoder helpers, on tiny checkpoints loaded by path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spasem import encoders as features
from spasem.model.latents import vae_posterior
from spasem.profiles import tiny_sd


@pytest.fixture(scope="module")
def paths(tiny) -> dict[str, str]:
    return tiny


@pytest.fixture(scope="module")
def text(paths):
    return features.load_text_encoder(paths["sd"])


def test_prompts_are_77_token_states_and_padding_does_not_leak(text):
    tok, enc = text
    states = features.encode_prompts(tok, enc, ["a red car on a street", "blurry"])
    assert states.shape == (2, 77, tiny_sd.TEXT_DIM) and not enc.training
    alone = features.encode_prompts(tok, enc, ["blurry"])
    torch.testing.assert_close(states[1], alone[0], rtol=1e-4, atol=1e-5)  # batch-mates never change a row
    assert not torch.allclose(states[0], states[1])


def test_phrases_pooled_masked_and_truncated(text):
    tok, enc = text
    emb, mask = features.encode_phrases(tok, enc, [["cat", "dog", "tree"], [], ["dog"]], max_boxes=2)
    assert emb.shape == (3, 2, tiny_sd.TEXT_DIM) and mask.tolist() == [[1, 1], [0, 0], [1, 0]]
    assert emb[1].abs().sum() == 0 and emb[2, 1].abs().sum() == 0
    torch.testing.assert_close(emb[0, 1], emb[2, 0], rtol=1e-4, atol=1e-5)  # "dog" is "dog" wherever it sits
    pooled = enc(tok(["cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids).pooler_output
    torch.testing.assert_close(emb[0, 0], pooled[0], rtol=1e-4, atol=1e-5)


def test_image_encoders_tokens_and_pooled(paths):
    enc = features.ImageEncoders.load(paths["clip_vision"], paths["dinov2"])
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 24, 40, 3), dtype=np.uint8)
    out = enc.encode(images)
    patches = (tiny_sd.ENCODER_IMAGE_SIZE // 8) ** 2 + 1
    assert out["clip_tokens"].shape == (3, patches, tiny_sd.CLIP_VISION_DIM)
    assert out["clip_pooled"].shape == (3, tiny_sd.CLIP_VISION_DIM)
    assert out["dino_tokens"].shape == (3, patches, tiny_sd.DINO_DIM)
    assert out["dino_pooled"].shape == (3, tiny_sd.DINO_DIM)
    single = enc.encode([images[1]])  # a list of arrays works, and a row does not depend on its batch
    torch.testing.assert_close(single["dino_pooled"][0], out["dino_pooled"][1], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(out["clip_pooled"][0], out["clip_pooled"][1])


def test_vae_posterior_mean_and_logvar(paths):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(paths["sd"], subfolder="vae")
    images = features.images_to_tensor(np.full((2, 32, 48, 3), 255, np.uint8))
    assert images.shape == (2, 3, 32, 48) and images.max() == 1.0
    post = vae_posterior(vae, images)
    assert post.shape == (2, 8, 4, 6)
    dist = vae.encode(images).latent_dist
    torch.testing.assert_close(post[:, :4], dist.mean)
    torch.testing.assert_close(post[:, 4:], dist.logvar)


def test_unknown_dtype_is_a_clear_error():
    assert features.torch_dtype("bf16") is torch.bfloat16
    with pytest.raises(ValueError, match="float32, bfloat16, float16"):
        features.torch_dtype("float8")


@pytest.mark.parametrize("shape", [(1, 1, 1, 3), (2, 5, 7, 3), (3, 64, 48, 3)])
def test_the_host_lookup_gives_to_signeds_floats(shape):
    """images_to_tensor on the CPU looks values up instead of converting; the floats must not change."""
    from spasem.pixels import to_signed

    images = np.random.default_rng(sum(shape)).integers(0, 256, shape, np.uint8)
    images[0, 0, 0] = (0, 127, 255)
    expected = to_signed(torch.from_numpy(images).permute(0, 3, 1, 2))
    out = features.images_to_tensor(images)
    assert out.dtype == torch.float32 and out.shape == expected.shape
    assert torch.equal(out, expected)  # bit for bit: the latents in the shards depend on them
    assert torch.equal(features.images_to_tensor(list(images)), expected)
