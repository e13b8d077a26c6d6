"""configs/models: the real-size architectures build (on the meta device) with their published sizes."""

from __future__ import annotations

import pytest
import torch

from spasem.profiles.real_size import available, build_from_config, load_spec, parameter_count

# published parameter counts, in millions (model cards / counted from the released checkpoints)
PUBLISHED = {
    "llava-1.5-7b": 7063, "grounding-dino-base": 232, "clip-vit-large-patch14": 303, "dinov2-base": 86.6,
    "sd15-unet": 859.5, "sd15-vae": 83.7, "sd15-text_encoder": 123.1,
    "sd21-unet": 865.9, "sd21-vae": 83.7, "sd21-text_encoder": 340.4,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_real_size_parameter_counts(name):
    model = build_from_config(name, torch.bfloat16, "meta")
    assert parameter_count(model) / 1e6 == pytest.approx(PUBLISHED[name], rel=0.01)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_sd_parts_fit_together():
    for sd, width in (("sd15", 768), ("sd21", 1024)):
        assert load_spec(f"{sd}-unet")["config"]["cross_attention_dim"] == width
        assert load_spec(f"{sd}-text_encoder")["config"]["hidden_size"] == width
    assert build_from_config("sd21-scheduler").config.prediction_type == "v_prediction"
    assert build_from_config("sd15-scheduler").config.prediction_type == "epsilon"
    assert load_spec("sd21-unet")["config"]["sample_size"] * 8 == 768


def test_unknown_architecture_lists_the_available_ones():
    with pytest.raises(FileNotFoundError, match="llava-1.5-7b"):
        load_spec("llava-13b")
    assert {"llava-1.5-7b", "sd15-unet", "sd21-vae"} <= set(available())
