"""SpatialSemanticSRPipeline on the tiny profile: output sizes for both fusions and LGCAA, the export
of SRObjective, save/load round-trip with identical outputs, scheduler swap, CFG, and the tiled-inference
entry points (``encode_conditioning`` + ``predict_noise``)."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DDIMScheduler, UniPCMultistepScheduler

from spasem.config.model import LossConfig, ModelConfig
from spasem.model.controlnet import SpatialSemanticControlNet
from spasem.model.sr_pipeline import NEGATIVE_PROMPT, SpatialSemanticSRPipeline
from training.objective import SRObjective

MODES = [("gated", "standard"), ("attention", "standard"), ("gated", "lgcaa")]


def lr_image(h: int = 20, w: int = 28, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx / w, yy / h, (xx + yy) / (h + w)], axis=-1) * 255
    return np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)


def trained_like(model_cfg: ModelConfig, tiny: dict, seed: int = 0) -> SRObjective:
    """An objective whose ControlNet has non-zero outputs everywhere, as after training."""
    obj = SRObjective.from_paths(tiny, model_cfg, LossConfig())
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in obj.controlnet.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    return obj


def run(pipe, image, seed: int = 0, **kwargs) -> np.ndarray:
    args = dict(prompt="a gradient", prompt_low="noisy, blurry", phrases=["sky"], boxes=[[0.0, 0.0, 1.0, 0.5]],
                num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(seed))
    return pipe(image, **{**args, **kwargs})


@pytest.mark.parametrize(("fusion", "attention"), MODES)
def test_pipeline_upscales_by_four_for_every_fusion_and_attention(tiny, fusion, attention):
    obj = trained_like(ModelConfig(fusion=fusion, attention=attention, max_boxes=4, lgcaa_window=4), tiny)
    pipe = obj.pipeline()
    out = run(pipe, lr_image(20, 28))  # 80 x 112: not a multiple of the UNet's 16 px, padded and cropped
    assert out.shape == (80, 112, 3) and out.dtype == np.float32
    assert np.isfinite(out).all() and 0 <= out.min() and out.max() <= 1
    pil = run(pipe, PIL.Image.fromarray(lr_image(16, 16)), output_type="pil", upscale=2)
    assert isinstance(pil, PIL.Image.Image) and pil.size == (32, 32)


def test_export_round_trip_gives_identical_outputs_and_any_scheduler(tiny, tmp_path):
    obj = trained_like(ModelConfig(fusion="attention", max_boxes=4), tiny, seed=1)
    image = lr_image(16, 24, seed=1)
    before = run(obj.pipeline(), image, seed=3)
    obj.export(str(tmp_path / "export"))
    pipe = SpatialSemanticSRPipeline.from_pretrained(str(tmp_path / "export"))
    assert isinstance(pipe.controlnet, SpatialSemanticControlNet) and pipe.controlnet.config.fusion == "attention"
    after = run(pipe, image, seed=3)
    np.testing.assert_array_equal(after, before)
    # a second save/load of the loaded pipeline is stable too
    pipe.save_pretrained(str(tmp_path / "again"))
    again = run(SpatialSemanticSRPipeline.from_pretrained(str(tmp_path / "again")), image, seed=3)
    np.testing.assert_array_equal(again, before)
    # any diffusers scheduler, any step count
    for cls in (DDIMScheduler, UniPCMultistepScheduler):
        pipe.scheduler = cls.from_config(pipe.scheduler.config)
        out = run(pipe, image, seed=3, num_inference_steps=3)
        assert out.shape == (64, 96, 3) and np.isfinite(out).all()
        assert np.abs(out - before).max() > 1e-4  # a different sampler gives a different image


def test_export_of_given_weights_leaves_training_module_alone(tiny, tmp_path):
    obj = trained_like(ModelConfig(max_boxes=4), tiny, seed=2)
    state = {k: torch.zeros_like(v) for k, v in obj.controlnet.state_dict().items()}
    live = {k: v.clone() for k, v in obj.controlnet.state_dict().items()}
    obj.export(str(tmp_path / "zeros"), controlnet_state_dict=state)
    loaded = SpatialSemanticControlNet.from_pretrained(str(tmp_path / "zeros"), subfolder="controlnet")
    assert all(torch.count_nonzero(v) == 0 for v in loaded.state_dict().values())
    assert all(torch.equal(v, live[k]) for k, v in obj.controlnet.state_dict().items())


def test_guidance_and_negative_prompt_change_the_output(tiny):
    pipe = trained_like(ModelConfig(max_boxes=4), tiny, seed=4).pipeline()
    image = lr_image(16, 16, seed=4)
    guided = run(pipe, image)
    assert np.abs(run(pipe, image, guidance_scale=1.0) - guided).max() > 1e-4
    assert np.abs(run(pipe, image, negative_prompt="sharp") - guided).max() > 1e-4
    cond = pipe.encode_conditioning(image[None], ["a"], ["b"], do_cfg=False)
    assert cond.negative_text is None and cond.box_mask.sum() == 0
    assert pipe.encode_conditioning(image[None], ["a"], ["b"]).negative_text.shape == cond.text_high.shape
    assert "blurry" in NEGATIVE_PROMPT


def test_predict_noise_on_tiles_matches_one_call_per_tile(tiny):
    pipe = trained_like(ModelConfig(max_boxes=4), tiny, seed=5).pipeline()
    images = np.stack([lr_image(16, 16, seed=5), lr_image(16, 16, seed=6)])
    cond = pipe.encode_conditioning(images, ["a cat", "a dog"], ["noisy", "sharp"], [["cat"], []],
                                    [[[0.1, 0.1, 0.5, 0.5]], []], NEGATIVE_PROMPT, do_cfg=True)
    g = torch.Generator().manual_seed(0)
    # two tiles per image, 8 x 16 latent px each (64 x 128 px of control image)
    latents = torch.randn(4, 4, 8, 16, generator=g)
    control = torch.rand(4, 3, 64, 128, generator=g) * 2 - 1
    t = pipe.scheduler.timesteps[0] if len(pipe.scheduler.timesteps) else torch.tensor(999)
    batched = pipe.predict_noise(latents, t, control, cond, guidance_scale=5.5)
    assert batched.shape == latents.shape
    single = cond.repeat_to(4)
    for i in range(4):
        one = type(cond)(**{k: None if v is None else v[i : i + 1] for k, v in vars(single).items()})
        torch.testing.assert_close(pipe.predict_noise(latents[i : i + 1], t, control[i : i + 1], one, 5.5),
                                   batched[i : i + 1], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="split evenly"):
        cond.repeat_to(3)
