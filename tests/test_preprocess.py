"""The torch image transforms match transformers' processors (CLIP, DINOv2, LLaVA's CLIP-336, Grounding DINO).

Tolerance: PIL's 8-bit resize and torch's antialiased kernels round differently, so a pixel may differ
by up to 2 uint8 levels (at most 2 / (255 * std) after normalization, 0.035 for ImageNet's std) and
the mean absolute difference stays under a quarter of a level (0.0044; on photos it is under 1e-4). Both of our resize paths are checked: the uint8 one
torch takes on CPU and the float one it takes on an accelerator.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import (
    AutoImageProcessor,
    BitImageProcessor,
    CLIPImageProcessor,
    GroundingDinoImageProcessor,
)

from spasem import preprocess
from spasem.preprocess import ImageTransform, resized_shape
from spasem.profiles.tiny_vlm import GDINO_SIZE, IMAGE_SIZE
from tests.conftest import skimage_photo

IMAGENET = {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}
# the published preprocessor_config.json of the real checkpoints the profiles name
REAL = {
    "clip-vit-large-patch14": lambda: CLIPImageProcessor(size={"shortest_edge": 224},
                                                         crop_size={"height": 224, "width": 224}),
    "dinov2-base": lambda: BitImageProcessor(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224},
                                             do_center_crop=True, **IMAGENET),
    "llava-1.5-7b (CLIP-336)": lambda: CLIPImageProcessor(size={"shortest_edge": 336},
                                                          crop_size={"height": 336, "width": 336}),
    "grounding-dino-base": lambda: GroundingDinoImageProcessor(),
}
TINY_VLM = {  # as spasem/profiles/tiny_vlm.py builds them
    "tiny llava": lambda: CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                                             crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}),
    "tiny grounding dino": lambda: GroundingDinoImageProcessor(
        size={"shortest_edge": GDINO_SIZE, "longest_edge": 2 * GDINO_SIZE}),
}
# an HR crop, an LR crop, and the two orientations of a non-square upscale input
SHAPES = [(512, 512), (128, 128), (300, 451), (451, 300)]


@pytest.fixture(scope="module")
def photos() -> dict[tuple[int, int], list[np.ndarray]]:
    photo = skimage_photo("astronaut.png")
    noise = np.random.default_rng(0).integers(0, 256, (512, 512, 3), dtype=np.uint8)
    return {s: [np.ascontiguousarray(photo[: s[0], : s[1]]), np.ascontiguousarray(noise[: s[0], : s[1]])]
            for s in SHAPES}


@pytest.fixture(params=[True, False], ids=["uint8-resize", "float-resize"])
def resize_path(request, monkeypatch):
    """Run each comparison through the CPU (uint8) and the accelerator (float) resize."""
    original = preprocess.resize_uint8
    monkeypatch.setattr(preprocess, "resize_uint8",
                        lambda x, size, mode, native=None: original(x, size, mode, native=request.param))


def assert_matches(processor, images: list[np.ndarray]) -> None:
    transform = ImageTransform.from_processor(processor)
    ref = processor(images=images, return_tensors="pt")
    out = transform(images)
    assert out["pixel_values"].shape == ref["pixel_values"].shape
    assert out["pixel_values"].dtype == torch.float32
    diff = (out["pixel_values"] - ref["pixel_values"]).abs()
    level = 1 / (255 * min(transform.std))
    assert diff.max() <= 2 * level + 1e-5, f"max diff {diff.max():.4f} > 2 levels ({2 * level:.4f})"
    assert diff.mean() < level / 4, f"mean diff {diff.mean():.5f}: more than a quarter of a level"
    if "pixel_mask" in ref:
        assert torch.equal(out["pixel_mask"], ref["pixel_mask"])


@pytest.mark.parametrize("name", list(REAL) + list(TINY_VLM))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_matches_processor(name, shape, photos, resize_path):
    assert_matches({**REAL, **TINY_VLM}[name](), photos[shape])


def test_matches_tiny_profile_processors_loaded_by_path(tiny, photos):
    """The CLIP and DINOv2 processors the tiny profile saves, loaded as the embeddings stage loads them."""
    for name in ("clip_vision", "dinov2"):
        processor = AutoImageProcessor.from_pretrained(tiny[name])
        for shape in SHAPES:
            assert_matches(processor, photos[shape])


def test_grounding_pads_a_mixed_batch_like_the_processor(photos):
    """Images of different sizes in one call: padded bottom-right to the largest, with the pixel mask."""
    processor = TINY_VLM["tiny grounding dino"]()
    assert_matches(processor, [photos[(300, 451)][0], photos[(512, 512)][1], photos[(451, 300)][0]])


def test_output_sizes_follow_transformers_rules():
    """Every (height, width) up to 2000 px in steps of 37: the same size as transformers' own size maths."""
    from transformers.image_transforms import get_resize_output_image_size, get_size_with_aspect_ratio

    for h in range(17, 2000, 37):
        for w in range(17, 2000, 37):
            image = np.zeros((h, w, 3), np.uint8)
            assert resized_shape(h, w, 224, None, None) == get_resize_output_image_size(
                image, 224, default_to_square=False, input_data_format="channels_last")
            assert resized_shape(h, w, 800, 1333, None) == get_size_with_aspect_ratio((h, w), 800, 1333)


def test_same_values_for_array_tensor_and_list_inputs(photos):
    transform = ImageTransform.from_processor(REAL["clip-vit-large-patch14"]())
    batch = np.stack(photos[(128, 128)])
    a = transform(batch)["pixel_values"]
    assert torch.equal(a, transform(torch.from_numpy(batch))["pixel_values"])
    assert torch.equal(a, transform(list(batch))["pixel_values"])
    assert transform(batch, dtype=torch.bfloat16)["pixel_values"].dtype == torch.bfloat16


def test_refuses_what_it_cannot_reproduce(photos):
    with pytest.raises(ValueError, match="uint8"):
        ImageTransform.from_processor(REAL["clip-vit-large-patch14"]())(np.zeros((1, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="different sizes"):
        ImageTransform(mode="bicubic", shortest_edge=32)([photos[(300, 451)][0], photos[(128, 128)][0]])

    class OtherImageProcessor:
        pass

    with pytest.raises(ValueError, match="OtherImageProcessor"):
        ImageTransform.from_processor(OtherImageProcessor())


def test_image_encoders_features_match_the_processor_path(tiny, photos):
    """The embeddings stage's features with the torch transforms equal those through the processors."""
    from spasem.encoders import ImageEncoders

    encoders = ImageEncoders.load(tiny["clip_vision"], tiny["dinov2"])
    images = photos[(128, 128)] + photos[(512, 512)]  # LR and HR in one pass, as the stage sends them
    ours = encoders.encode(images)
    encoders.use_processors = True
    ref = encoders.encode(images)
    for name, value in ours.items():
        assert value.shape == ref[name].shape
        torch.testing.assert_close(value, ref[name], atol=0.05, rtol=0.05)
        cos = torch.nn.functional.cosine_similarity(value.flatten(1), ref[name].flatten(1))
        assert cos.min() > 0.999, name


def test_transforms_sharing_a_batch_resize_once_and_give_their_own_values(photos, resize_path):
    """CLIP and DINOv2 of one ImageBatch: same pixel values as separate calls; a shared resize is made once
    and never written to (the float resize path returns a tensor the normalization could alter)."""
    from spasem.preprocess import ImageBatch

    images = photos[(128, 128)] + photos[(512, 512)]
    clip = ImageTransform.from_processor(REAL["clip-vit-large-patch14"]())
    small = ImageTransform(mode="bicubic", shortest_edge=32, crop=(32, 32), mean=(0.5,) * 3, std=(0.25,) * 3)
    alike = ImageTransform(mode="bicubic", shortest_edge=32, crop=(32, 32), mean=(0.1,) * 3, std=(0.5,) * 3)
    batch = ImageBatch(images)
    made = []
    resize = preprocess.resize_uint8
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(preprocess, "resize_uint8", lambda *a, **k: made.append(a[1]) or resize(*a, **k))
        shared = [t(batch)["pixel_values"] for t in (clip, small, alike, small)]
    assert sorted(made) == sorted([(224, 224)] * 2 + [(32, 32)] * 2)  # per size group: 224 once, 32 once
    for transform, values in zip((clip, small, alike, small), shared, strict=True):
        assert torch.equal(values, transform(images)["pixel_values"])
