"""PSNR/SSIM against independently computed values (BasicSR's and pyiqa's protocols), the CLIP good-photo
score on a tiny random-init CLIP, pyiqa skipping."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import skimage.color
from skimage.metrics import structural_similarity

from spasem.metrics import (
    ClipGoodPhoto,
    PyiqaMetrics,
    _no_downloads,
    bgr2ycbcr,
    calculate_psnr,
    calculate_ssim,
    full_reference_metrics,
    rgb2ycbcr,
)
from tests.conftest import skimage_photo

Y_GAIN = (65.481 + 128.553 + 24.966) / 255  # a gray offset d moves Y by d * Y_GAIN


def _byte_alphabet() -> list[str]:
    """The byte-level BPE alphabet of GPT-2 and CLIP: printable bytes as themselves, the rest from U+0100 on."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in printable]
    table = {b: chr(b) for b in printable} | {b: chr(0x100 + i) for i, b in enumerate(others)}
    return [table[b] for b in range(256)]


def build_tiny_clip(folder: Path) -> Path:
    """A random-init CLIP (ViT) with a byte-level CLIP tokenizer, saved as a real model folder is."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    try:
        from transformers import CLIPImageProcessorPil as Processor
    except ImportError:
        from transformers import CLIPImageProcessor as Processor

    folder.mkdir(parents=True, exist_ok=True)
    alphabet = _byte_alphabet()
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab.update({c + "</w>": i + 256 for i, c in enumerate(alphabet)})
    vocab.update({"<|startoftext|>": 512, "<|endoftext|>": 513})
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")  # no merges: every word is spelled out in characters
    text = dict(vocab_size=514, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=32, bos_token_id=512, eos_token_id=513, pad_token_id=513)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=32, patch_size=8)
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(folder)
    Processor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    return build_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    return skimage_photo("astronaut.png")[100:260, 150:330]  # 160x180, a face and textured suit


def _noisy(img: np.ndarray, sigma: float, seed: int = 0) -> np.ndarray:
    noise = np.random.default_rng(seed).normal(0, sigma, img.shape)
    return np.clip(np.round(img + noise), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("d", [1, 3, 10])
def test_psnr_of_constant_offset_is_analytic(d):
    hr = np.random.default_rng(1).integers(20, 230, (40, 50, 3)).astype(np.uint8)
    sr = hr + np.uint8(d)
    assert calculate_psnr(sr, hr, crop_border=4) == pytest.approx(20 * math.log10(255 / d), abs=1e-9)
    # a gray offset moves Y by d * 219/255 (BT.601 studio range); float32 Y as in BasicSR
    expected_y = 20 * math.log10(255 / (d * Y_GAIN))
    assert calculate_psnr(sr, hr, crop_border=4, test_y_channel=True) == pytest.approx(expected_y, abs=1e-3)


def test_identical_images_give_inf_psnr_and_unit_ssim(photo):
    metrics = full_reference_metrics(photo, photo.copy(), crop_border=4)
    assert metrics["psnr_y"] == math.inf and metrics["psnr_rgb"] == math.inf
    assert metrics["ssim_y"] == pytest.approx(1.0, abs=1e-12)
    assert metrics["ssim_rgb"] == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("border", [0, 4])
def test_y_metrics_match_skimage_on_the_cropped_luma(photo, border):
    sr = _noisy(photo, 12)
    crop = (slice(border, -border or None), slice(border, -border or None))
    y_sr = skimage.color.rgb2ycbcr(sr)[crop][..., 0]  # float64, independent of our conversion
    y_hr = skimage.color.rgb2ycbcr(photo)[crop][..., 0]
    ref_ssim = structural_similarity(y_hr, y_sr, gaussian_weights=True, sigma=1.5,
                                     use_sample_covariance=False, data_range=255)
    ref_psnr = 10 * math.log10(255**2 / np.mean((y_hr - y_sr) ** 2))
    assert calculate_ssim(sr, photo, border, test_y_channel=True) == pytest.approx(ref_ssim, abs=1e-5)
    assert calculate_psnr(sr, photo, border, test_y_channel=True) == pytest.approx(ref_psnr, abs=1e-3)


def test_rgb_ssim_is_channel_mean_as_skimage(photo):
    sr = _noisy(photo, 20, seed=3)
    ref = structural_similarity(photo[4:-4, 4:-4], sr[4:-4, 4:-4], channel_axis=2, gaussian_weights=True,
                                sigma=1.5, use_sample_covariance=False, data_range=255)
    assert calculate_ssim(sr, photo, crop_border=4) == pytest.approx(ref, abs=1e-9)


def test_border_crop_ignores_damage_inside_the_border(photo):
    sr = photo.copy()
    sr[:3] = 0
    sr[:, -3:] = 255
    assert calculate_psnr(sr, photo, crop_border=3) == math.inf
    assert calculate_ssim(sr, photo, crop_border=3, test_y_channel=True) == pytest.approx(1.0, abs=1e-12)
    assert calculate_psnr(sr, photo, crop_border=2) < 30
    assert calculate_ssim(sr, photo, crop_border=2) < 1 - 1e-4  # the valid SSIM map sees it only through its window


def test_blue_only_error_hurts_y_much_less_than_rgb():
    hr = np.random.default_rng(2).integers(20, 230, (32, 32, 3)).astype(np.uint8)
    sr = hr.copy()
    sr[..., 2] += 12
    # RGB: the error sits in one channel of three; Y: blue weighs 24.966/255 in BT.601 luma
    assert calculate_psnr(sr, hr, 0) == pytest.approx(10 * math.log10(3 * 255**2 / 144), abs=1e-9)
    assert calculate_psnr(sr, hr, 0, test_y_channel=True) == pytest.approx(
        20 * math.log10(255 / (12 * 24.966 / 255)), abs=1e-3)
    assert calculate_ssim(sr, hr, 0, test_y_channel=True) > calculate_ssim(sr, hr, 0)


def test_ycbcr_matches_matlab_values_and_channel_orders():
    px = np.array([[[255, 0, 0], [255, 255, 255], [0, 0, 0]]], np.uint8)
    # MATLAB rgb2ycbcr: red -> (81, 90, 240), white -> (235, 128, 128), black -> (16, 128, 128)
    assert rgb2ycbcr(px).tolist() == [[[81, 90, 240], [235, 128, 128], [16, 128, 128]]]
    assert rgb2ycbcr(px, y_only=True).tolist() == [[81, 235, 16]]
    assert np.array_equal(bgr2ycbcr(px[..., ::-1]), rgb2ycbcr(px))
    img = np.random.default_rng(4).integers(0, 256, (20, 20, 3)).astype(np.uint8)
    bgr = np.ascontiguousarray(img[..., ::-1])
    assert calculate_psnr(bgr, _noisy(img, 5)[..., ::-1], 2, True, color_order="bgr") == pytest.approx(
        calculate_psnr(img, _noisy(img, 5), 2, True))


def test_gray_images_and_errors():
    gray = skimage_photo("camera.png")[:64, :64]
    sr = _noisy(gray, 6)
    ref = structural_similarity(gray[2:-2, 2:-2], sr[2:-2, 2:-2], gaussian_weights=True, sigma=1.5,
                                use_sample_covariance=False, data_range=255)
    assert calculate_ssim(sr, gray, 2, test_y_channel=True) == pytest.approx(ref, abs=1e-9)
    with pytest.raises(ValueError, match="shapes differ"):
        calculate_psnr(gray, gray[:, :-1], 0)
    with pytest.raises(ValueError, match="11x11"):
        calculate_ssim(gray[:20, :20], gray[:20, :20], crop_border=5)


def _pattern_pair() -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:40, 0:48]
    hr = np.stack([(xx * 5 + yy * 3) % 256, (xx * yy) % 256, (200 - 4 * yy + xx) % 256], -1).astype(np.uint8)
    offset = ((xx * 7 + yy * 11) % 17 - 8)[..., None] * np.array([1, 2, 3])
    sr = np.clip(hr.astype(int) + offset, 0, 255).astype(np.uint8)
    sr[:2] = 0  # a damaged border: BasicSR's protocol crops it away, pyiqa's counts it
    return sr, hr


def test_pyiqa_protocol_matches_pyiqa_as_xpsr_calls_it():
    sr, hr = _pattern_pair()
    # pyiqa 0.1.10's own psnr/ssim (PSNR(), SSIM() on XPSR test.py's rgb2ycbcr_pt Y; PSNR(), SSIM(test_y_channel
    # =False) on RGB), run once on this pair; float32 inputs there, so agreement to ~1e-6
    expected = {"psnr_y": 24.13618324589066, "ssim_y": 0.9579279357383239,
                "psnr_rgb": 17.167612075805664, "ssim_rgb": 0.7512483632507051}
    got = full_reference_metrics(sr, hr, 0, protocol="pyiqa")
    assert got == pytest.approx(expected, abs=2e-6)
    basicsr = full_reference_metrics(sr, hr, 4)
    assert basicsr["psnr_y"] > got["psnr_y"] + 3, "the cropped border hides the damage from BasicSR's numbers"
    # identical images: pyiqa's eps gives 80 dB, BasicSR inf; a flipped image has negative structure,
    # which pyiqa clips at 0 and BasicSR keeps
    assert full_reference_metrics(hr, hr, 0, "pyiqa")["psnr_y"] == pytest.approx(80.0)
    ramp = np.tile(np.linspace(0, 255, 48), (40, 1)).round().astype(np.uint8)[..., None].repeat(3, -1)
    flipped = np.ascontiguousarray(ramp[:, ::-1])
    assert calculate_ssim(flipped, ramp, 0) < 0 <= full_reference_metrics(flipped, ramp, 0, "pyiqa")["ssim_rgb"]
    with pytest.raises(ValueError, match="protocol"):
        full_reference_metrics(sr, hr, 0, protocol="matlab")


def test_clip_good_photo_is_a_deterministic_probability(tiny_clip, photo):
    import torch
    from transformers import CLIPModel, CLIPTokenizer

    iqa = ClipGoodPhoto(str(tiny_clip))
    images = [photo, _noisy(photo, 40), skimage_photo("coffee.png")]
    scores = iqa(images)
    assert len(scores) == 3 and all(0.0 <= s <= 1.0 for s in scores)
    assert ClipGoodPhoto(str(tiny_clip))(images) == scores
    assert iqa([images[2]])[0] == pytest.approx(scores[2], abs=1e-6)
    # the same score from CLIPModel.forward's normalized embeddings: softmax(100 * cos) over the two prompts
    model = CLIPModel.from_pretrained(tiny_clip).eval()
    tokens = CLIPTokenizer.from_pretrained(tiny_clip)(["Good photo.", "Bad photo."], padding=True, return_tensors="pt")
    pixels = iqa.processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"], pixel_values=pixels)
    expected = (100 * out.image_embeds @ out.text_embeds.T).softmax(-1)[:, 0]
    assert scores == pytest.approx(expected.tolist(), abs=1e-5)


def test_pyiqa_metrics_are_skipped_with_a_note_when_unavailable(monkeypatch):
    monkeypatch.setitem(sys.modules, "pyiqa", None)  # as if not installed, whatever this machine has
    metrics = PyiqaMetrics(["musiq", "lpips"])
    assert metrics.metrics == {}
    assert "pyiqa is not installed" in metrics.notes[0] and "musiq, lpips" in metrics.notes[0]
    assert metrics(np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8, 3), np.uint8)) == {}
    assert PyiqaMetrics([]).notes == []


def test_no_downloads_guard_refuses_and_restores():
    import torch.hub

    original = torch.hub.download_url_to_file
    with _no_downloads(), pytest.raises(FileNotFoundError, match="not present locally"):
        torch.hub.download_url_to_file("https://example.invalid/weights.pth", "/nonexistent/weights.pth")
    assert torch.hub.download_url_to_file is original
