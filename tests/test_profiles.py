"""No silent toy models: the tiny profile says so on every entry point unless it runs on the bundled
sample photos, annotated markers record the profile, and training refuses shards made with other
models than its config names, naming both."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from pipeline.prepare import main as prepare_main
from pipeline.upscale import main as upscale_main
from spasem.config import CONFIG_DIR, ConfigError, StorageConfig, load_config, sample_photos
from spasem.profiles import announce_tiny, check_shard_models, prepared_from, stage_model_ids
from spasem.shards import FINAL_DIR, ShardWriter, encode_pair
from spasem.storage import LocalStore
from training.launch import main as launch_main

SD15 = str(CONFIG_DIR / "sd15.yaml")


def write_shards(root, stages_per_shard: list[dict[str, str]]) -> None:
    """Tiny real shards (HR/LR pairs) whose markers name ``stages``, as the annotate phase writes them."""
    store = LocalStore(root).child(FINAL_DIR)
    rng = np.random.default_rng(0)
    for index, stages in enumerate(stages_per_shard):
        writer = ShardWriter(store, index)
        for i in range(2):
            hr = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
            writer.write(encode_pair(f"img{index}_{i}", hr, hr[::4, ::4], {"key": f"img{index}_{i}"}))
        writer.close({"read": "pillow", **stages})


def tiny_ids() -> dict[str, str]:
    return {**stage_model_ids(load_config().models, ["captions", "grounding", "embeddings", "encode"]),
            "profile": "tiny"}


def test_tiny_ids_name_the_profile_and_real_ids_name_the_weights():
    ids = tiny_ids()
    assert ids["captions"] == "tiny-v1/llava" and ids["embeddings"] == "tiny-v1/clip_vision+tiny-v1/dinov2"
    real = stage_model_ids(load_config(SD15).models, ["encode", "embeddings"])
    assert "tiny" not in "".join(real.values()) and real["encode"] == load_config(SD15).models.sd


def test_training_refuses_shards_made_by_other_models_naming_both(tmp_path, capsys):
    write_shards(tmp_path, [tiny_ids(), tiny_ids()])
    sd15 = load_config(SD15).models
    with pytest.raises(ConfigError) as err:
        check_shard_models(LocalStore(tmp_path), sd15)
    text = str(err.value)
    assert "'tiny-v1/sd'" in text and repr(sd15.sd) in text and "models.sd" in text, text
    assert "shard-000000.json" in text
    # the entry point: one error line, exit 1, before any Ray worker or model is started
    assert launch_main(["--config", SD15, "--input", str(tmp_path), "--output", str(tmp_path / "run"),
                        "--set", "train.batch_size=1", "--set", "train.num_workers=1"]) == 1
    assert "'tiny-v1/sd'" in capsys.readouterr().err
    # the same shards with the config they were made with pass, and agree on one id per stage
    assert check_shard_models(LocalStore(tmp_path), load_config().models)["encode"] == "tiny-v1/sd"


def test_training_refuses_shards_that_disagree_with_each_other(tmp_path):
    other = {**tiny_ids(), "captions": "llava-hf/llava-1.5-7b-hf"}
    write_shards(tmp_path, [tiny_ids(), other])
    with pytest.raises(ConfigError, match="captions: the shards disagree") as err:
        check_shard_models(LocalStore(tmp_path), load_config().models)
    assert "'tiny-v1/llava'" in str(err.value) and "'llava-hf/llava-1.5-7b-hf'" in str(err.value)
    assert "shard-000001.json" in str(err.value)


def test_pairs_without_annotations_have_nothing_to_disagree_on(tmp_path):
    write_shards(tmp_path, [{}, {}])
    assert check_shard_models(LocalStore(tmp_path), load_config(SD15).models) == {}


def test_tiny_announces_itself_except_on_the_sample_photos(caplog):
    tiny, real = load_config().models, load_config(SD15).models
    with caplog.at_level(logging.WARNING, logger="spasem.profiles"):
        assert not announce_tiny(tiny, sample_photos(), "pipeline.prepare")
        assert not announce_tiny(real, "/data/photos", "pipeline.prepare")
        assert not caplog.records
        assert announce_tiny(tiny, "/data/photos", "pipeline.prepare")
        assert announce_tiny(tiny, None, "training.launch")  # shards of unknown origin
    line = caplog.records[0].getMessage()
    assert len(caplog.records) == 2
    assert line.startswith("pipeline.prepare: models.profile=tiny") and "--config configs/sd15.yaml" in line


def test_training_finds_the_photos_its_shards_came_from(tmp_path):
    (tmp_path / "config.yaml").write_text(f"input: {sample_photos()}\n")
    storage = StorageConfig()
    assert prepared_from(str(tmp_path), storage) == sample_photos()
    assert prepared_from(str(tmp_path / FINAL_DIR), storage) == sample_photos()
    assert prepared_from(str(tmp_path / "elsewhere"), storage) is None


@pytest.mark.parametrize("main", [prepare_main, upscale_main], ids=["prepare", "upscale"])
def test_entry_points_announce_tiny_on_a_user_folder(main, tmp_path, caplog):
    (tmp_path / "photos").mkdir()  # empty: the run stops at the listing, after the announcement
    with caplog.at_level(logging.WARNING, logger="spasem.profiles"):
        assert main(["--input", str(tmp_path / "photos"), "--output", str(tmp_path / "out")]) == 1
    assert any("models.profile=tiny" in r.getMessage() for r in caplog.records)


def test_a_relative_cache_inside_a_ray_job_package_moves_to_the_home_cache(tmp_path, monkeypatch):
    from spasem.profiles import fixed_cache

    models = load_config().models
    monkeypatch.chdir(tmp_path)
    assert fixed_cache(models).cache_dir == str(tmp_path / ".cache" / "models")
    # `ray job submit --working-dir .` runs the driver in a package folder Ray deletes when released
    package = tmp_path / "session_1" / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123"
    package.mkdir(parents=True)
    monkeypatch.chdir(package)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert fixed_cache(models).cache_dir == str(tmp_path / "home" / ".cache" / "spasem" / "models")
    absolute = models.model_copy(update={"cache_dir": str(tmp_path / "shared")})
    assert fixed_cache(absolute).cache_dir == str(tmp_path / "shared")


def test_a_training_worker_of_rank_1_builds_complete_tiny_models(tmp_path, monkeypatch):
    # a Ray Train worker has torch.distributed up; transformers then saves on rank 0 only
    import transformers.distributed.mixin as mixin

    from spasem.profiles import ensure_tiny

    monkeypatch.setattr(mixin, "_is_torch_distributed_initialized", lambda: True)
    monkeypatch.setattr(mixin, "_get_torch_distributed_rank", lambda: 1)
    sd = ensure_tiny(tmp_path, ("sd",))["sd"]
    assert any(p.suffix == ".safetensors" for p in (tmp_path / "tiny-v1" / "sd" / "text_encoder").iterdir()), sd
