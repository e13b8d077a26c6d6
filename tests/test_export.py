"""The training export: by default the trained ControlNet and a reference to its base models (no frozen
weights), with ``train.export_full`` a self-contained pipeline folder; both load with ``load_sr_pipeline``
and upscale to the same pixels. The driver's check reads no weights (S3 via moto), and the model card
names the steps and the base model's licence.

The exports here are written by the code ``Runner.export`` calls (``SRObjective.export`` and
``write_reference``) around a ControlNet with non-zero outputs; tests/test_train.py checks the exports of
real training runs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from spasem.config import ConfigError, StorageConfig, load_config
from spasem.config.annotate import ModelsConfig
from spasem.config.model import ModelConfig
from spasem.model.export import check_model, local_model
from spasem.model.sr_pipeline import INDEX, REFERENCE, load_sr_pipeline, write_reference
from tests.test_sr_pipeline import lr_image, run, trained_like
from training.model_card import model_card

FROZEN = ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "clip_vision", "dino")


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def exports(tiny, tmp_path_factory):
    """(default export, full export, the models section they reference, the trained objective)."""
    model_cfg = ModelConfig(max_boxes=4)
    obj = trained_like(model_cfg, tiny, seed=4)
    models = ModelsConfig(cache_dir=str(Path(tiny["sd"]).parents[1]))  # the session's tiny cache
    root = tmp_path_factory.mktemp("exports")
    for name, full in (("default", False), ("full", True)):
        obj.export(str(root / name), full=full)
        write_reference(root / name, models, model_cfg)
    return root / "default", root / "full", models, obj


def test_default_export_holds_the_controlnet_and_a_reference_not_the_frozen_weights(exports, tiny):
    default, full, _, _ = exports
    assert sorted(p.name for p in default.iterdir()) == ["controlnet", REFERENCE]
    assert (default / "controlnet" / "diffusion_pytorch_model.safetensors").is_file()
    assert not any((default / name).exists() for name in FROZEN + (INDEX,))
    ref = json.loads((default / REFERENCE).read_text())
    assert ref["models"] == {"profile": "tiny", "sd": ModelsConfig().sd, "clip_vision": ModelsConfig().clip_vision,
                             "dinov2": ModelsConfig().dinov2}
    assert ref["model_ids"]["sd"] == "tiny-v1/sd" and ref["model"]["max_boxes"] == 4
    # as configured, never this machine's resolved cache path: another machine resolves them itself
    assert str(Path(tiny["sd"]).parents[1]) not in (default / REFERENCE).read_text()
    assert (full / INDEX).is_file() and all((full / name).is_dir() for name in FROZEN)
    assert _size(default) < _size(full) / 2, (_size(default), _size(full))


def test_default_and_full_export_upscale_to_the_same_pixels(exports):
    default, full, models, obj = exports
    image = lr_image(16, 24, seed=5)
    by_reference = load_sr_pipeline(str(default), models=models)
    by_index = load_sr_pipeline(str(full), models=models)
    trained = obj.controlnet.state_dict()
    assert all(np.array_equal(v.numpy(), trained[k].numpy()) for k, v in by_reference.controlnet.state_dict().items())
    a, b = run(by_reference, image, seed=6), run(by_index, image, seed=6)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, run(obj.pipeline(), image, seed=6))


def test_full_export_loads_without_the_reference_or_any_base_model(exports, tmp_path):
    _, full, _, _ = exports
    alone = tmp_path / "alone"
    shutil.copytree(full, alone, ignore=shutil.ignore_patterns(REFERENCE))
    empty = tmp_path / "no-models"
    pipe = load_sr_pipeline(str(alone), models=ModelsConfig(cache_dir=str(empty)))
    assert pipe.unet is not None and not empty.exists()  # nothing resolved, nothing built


def test_a_reference_to_other_tiny_models_is_refused_naming_both(exports, tmp_path):
    default, _, models, _ = exports
    stale = tmp_path / "stale"
    shutil.copytree(default, stale)
    ref = json.loads((stale / REFERENCE).read_text())
    ref["model_ids"]["sd"] = "tiny-v0/sd"
    (stale / REFERENCE).write_text(json.dumps(ref))
    with pytest.raises(ConfigError, match="tiny-v0/sd.*tiny-v1/sd"):
        load_sr_pipeline(str(stale), models=models)


def test_driver_checks_an_s3_export_without_reading_weights(exports, bucket, s3_server, monkeypatch):
    default, _, models, _ = exports
    for path in default.rglob("*"):
        if path.is_file():
            s3_server.put_object(Bucket=bucket, Key=f"run/export/{path.relative_to(default)}", Body=path.read_bytes())
    s3_server.put_object(Bucket=bucket, Key="weights/unet.safetensors", Body=b"weights, but no export")
    storage = StorageConfig()
    reads = []
    monkeypatch.setattr("spasem.storage.S3Store.read", lambda self, rel: reads.append(rel))
    assert check_model(f"s3://{bucket}/run/export", storage) == f"s3://{bucket}/run/export"
    with pytest.raises(ConfigError, match=f"s3://{bucket}/weights has neither {INDEX} nor {REFERENCE}"):
        check_model(f"s3://{bucket}/weights", storage)
    assert reads == []
    monkeypatch.undo()
    # the node that loads fetches the small export into its own cache and resolves the base models there
    folder = Path(local_model(f"s3://{bucket}/run/export", models, ModelConfig(), storage))
    assert folder.is_relative_to(Path(models.cache_dir) / "remote")
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == ["controlnet", REFERENCE]


def test_model_card_names_steps_data_and_the_base_models_licence(tmp_path):
    base = tmp_path / "my-sd"
    base.mkdir()
    (base / "README.md").write_text("---\nlicense: creativeml-openrail-m\ntags: [stable-diffusion]\n---\n# SD\n")
    cfg = load_config(overrides=["models.profile=real", f"models.sd={base}", "models.dinov2=acme/dino-x"])
    card = model_card(cfg, step=1200, epoch=3, data="40 samples in 5 WebDataset shards under `s3://b/prepared`")
    head = card.split("---")[1]
    assert "license: creativeml-openrail-m" in head and "base_model" not in head  # a local folder is no hub id
    assert "for 1200 optimizer steps (epoch 3)" in card and "5 WebDataset shards under `s3://b/prepared`" in card
    assert f"`models.sd`: `{base}`, licence: creativeml-openrail-m" in card
    assert "`models.clip_vision`: `openai/clip-vit-large-patch14`, licence: mit" in card
    assert "`models.dinov2`: `acme/dino-x`, licence: see the base model's card" in card
    assert "```yaml\n" in card and "export_full: false" in card
    hub = model_card(load_config(overrides=["models.profile=real", "models.sd=runwayml/stable-diffusion-v1-5"]),
                     step=5, epoch=0, data="")
    assert "base_model: runwayml/stable-diffusion-v1-5\nlicense: creativeml-openrail-m" in hub
    tiny = model_card(load_config(overrides=["train.export_full=true"]), step=5, epoch=0, data="")
    assert "license: other" in tiny and "no licence of their own" in tiny and "model_index.json" in tiny
