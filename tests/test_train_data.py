"""Training's pieces without Ray Train: per-worker streams and their resume, the resume rule, DeepSpeed config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from spasem.config import load_config
from spasem.shards import ShardWriter, encode_json, encode_npy, encode_png
from spasem.storage import LocalStore, open_store
from training.checkpoints import TrainState, latest_checkpoint, resume_point
from training.data import DataError, rank_dataset, stream_plan, to_torch, training_shards
from training.deepspeed_config import build_deepspeed_config


def _write_shards(folder: Path, counts: list[int], annotated: bool) -> list[list[str]]:
    """Real shards in prepare's format; the annotated ones carry captions, boxes and a latent."""
    import numpy as np

    rng = np.random.default_rng(0)
    store = LocalStore(folder)
    keys = []
    for index, count in enumerate(counts):
        writer = ShardWriter(store, index)
        names = [f"img{index:02d}_{i:03d}" for i in range(count)]
        for key in names:
            sample = {"__key__": key, "hr.png": encode_png(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)),
                      "lr.png": encode_png(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)),
                      "json": encode_json({"key": key}), "extra.pyd": b"never decoded"}
            if annotated and index == 0:  # the HR's quality caption: only the first shard was annotated with it
                sample.update({"caption.json": encode_json({"high": f"photo {key}", "low": "sharp",
                                                            "low_hr": f"clean {key}", "model": "t"}),
                               "text_low_hr.npy": encode_npy(rng.standard_normal((77, 16)).astype(np.float16))})
            elif annotated:
                sample["caption.json"] = encode_json({"high": f"photo {key}", "low": "sharp", "model": "t"})
            if annotated:
                sample.update({"boxes.json": encode_json({"phrases": ["cat", "dog"], "boxes": [[0, 0, .5, .5], [.5, .5, 1, 1]],
                                                          "scores": [.9, .8], "model": "t"}),
                               "text.npy": encode_npy(rng.standard_normal((2, 77, 16)).astype(np.float16)),
                               "latent.npy": encode_npy(rng.standard_normal((8, 4, 4)).astype(np.float16))})
            writer.write(sample)
        writer.close({})
        keys.append(names)
    return keys


def _stream(plan, rank, world, batch, epoch, epoch_step, steps) -> list[list[str]]:
    ds = rank_dataset(plan, rank, world, batch, 1, epoch, epoch_step, steps, max_boxes=4)
    return [list(b["key"]) for b in ds.iter_batches(batch_size=batch, batch_format="numpy")]


def _planned(plan, rank, world, rows_per_step, epoch) -> list[str]:
    per_epoch = plan.steps_per_epoch(world, rows_per_step, epoch)
    return [k for w in plan.windows(rank, world, epoch, per_epoch * rows_per_step) for k in w.keys]


def test_each_epoch_is_a_new_seeded_order_that_covers_every_sample_once(tmp_path):
    keys = _write_shards(tmp_path / "shards", [4] * 6, annotated=False)
    plan = training_shards(str(tmp_path), seed=7, shuffle_window=2)
    everything = sorted(k for shard in keys for k in shard)
    epochs = []
    for epoch in (0, 1):
        streams = [_planned(plan, r, 2, 2, epoch) for r in (0, 1)]
        seen = streams[0] + streams[1]
        assert sorted(seen) == everything  # none twice, none skipped
        epochs.append(streams)
    assert epochs[0] != epochs[1] and epochs[0][0] != sorted(epochs[0][0])  # shuffled, and anew each epoch
    # a pure function of (seed, epoch, rank): planned again, the same; another seed, another order
    again = training_shards(str(tmp_path), seed=7, shuffle_window=2)
    assert [_planned(again, r, 2, 2, 1) for r in (0, 1)] == epochs[1]
    assert [_planned(training_shards(str(tmp_path), seed=8, shuffle_window=2), r, 2, 2, 0) for r in (0, 1)] != epochs[0]


def test_stream_plan_resumes_mid_epoch_and_runs_on_into_the_next(tmp_path):
    _write_shards(tmp_path / "shards", [4, 3, 4, 5], annotated=False)
    plan = training_shards(str(tmp_path), seed=1, shuffle_window=2)
    rows = 2
    per = [plan.steps_per_epoch(2, rows, e) for e in range(3)]

    def keys_of(items, rank):
        out = []
        for it in items:
            per_epoch = plan.steps_per_epoch(2, rows, it["epoch"])
            window = plan.windows(rank, 2, it["epoch"], per_epoch * rows)[it["window"]]
            out += window.keys[it["start"]:it["stop"]]
        return out

    for rank in (0, 1):
        whole = keys_of(stream_plan(plan, rank, 2, rows, 0, 0, per[0] + per[1] + 1), rank)
        expected = _planned(plan, rank, 2, rows, 0) + _planned(plan, rank, 2, rows, 1)
        assert whole[: len(expected)] == expected and len(whole) == len(expected) + rows
        for skip in range(1, per[0]):  # a checkpoint after `skip` steps: the rest is exactly the remainder
            rest = keys_of(stream_plan(plan, rank, 2, rows, 0, skip, per[0] + per[1] - skip), rank)
            assert rest == expected[skip * rows:]


@pytest.mark.slow
def test_worker_streams_follow_the_plan_and_spread_the_crops_of_a_photo(tmp_path, ray_cluster):
    # each shard holds the 4 crops of one photo, written next to each other as prepare writes them
    keys = _write_shards(tmp_path / "shards", [4] * 4, annotated=False)
    plan = training_shards(str(tmp_path), seed=3, shuffle_window=2)
    per_epoch = plan.steps_per_epoch(2, 4)
    for rank in (0, 1):
        batches = _stream(plan, rank, 2, 4, 0, 0, 2 * per_epoch)
        flat = [k for b in batches for k in b]
        assert flat == _planned(plan, rank, 2, 4, 0) + _planned(plan, rank, 2, 4, 1)
        for batch in batches:  # in shard order every batch would be one photo's 4 crops
            assert len({k.split("_")[0] for k in batch}) > 1, batches
        # resumed after one step of epoch 1: exactly the samples the uninterrupted stream had next
        resumed = [k for b in _stream(plan, rank, 2, 4, 1, 1, per_epoch - 1) for k in b]
        assert resumed == flat[(per_epoch + 1) * 4:]
    assert {k.split("_")[0] for shard in keys for k in shard} == {"img00", "img01", "img02", "img03"}


@pytest.mark.slow
def test_annotated_members_are_decoded_and_padded(tmp_path, ray_cluster):
    _write_shards(tmp_path / "shards", [2, 2], annotated=True)
    plan = training_shards(str(tmp_path))
    assert set(plan.members) == {"latent.npy", "text.npy", "text_low_hr.npy", "caption.json", "boxes.json"}
    ds = rank_dataset(plan, 0, 1, 2, 1, 0, 0, 2, max_boxes=4)
    batch = to_torch(next(iter(ds.iter_batches(batch_size=2, batch_format="numpy"))))
    assert batch["hr"].shape == (2, 3, 32, 32) and batch["lr"].shape == (2, 3, 8, 8)
    assert -1.0 <= float(batch["hr"].min()) and float(batch["hr"].max()) <= 1.0
    assert batch["latent"].shape == (2, 8, 4, 4) and batch["caption_high"][0].startswith("photo img0")
    assert batch["phrases"] == [["cat", "dog"], ["cat", "dog"]]
    # the HR's quality caption and its states (what model.original_image_ratio conditions on), present in
    # the first shard's samples only: every batch has the columns, has_low_hr says whose they are
    for raw in ds.iter_batches(batch_size=2, batch_format="numpy"):
        batch = to_torch(raw)
        first = [k.startswith("img00") for k in batch["key"]]
        assert batch["has_low_hr"].tolist() == first
        assert batch["caption_low_hr"] == [f"clean {k}" if f else "" for k, f in zip(batch["key"], first, strict=True)]
        assert batch["text_low_hr"].shape == (2, 77, 16)
        assert [bool(s.any()) for s in batch["text_low_hr"]] == first
    assert batch["boxes"].shape == (2, 4, 4) and batch["box_mask"].tolist() == [[1, 1, 0, 0]] * 2
    assert "extra" not in batch and "extra.pyd" not in batch  # unknown members never leave the tar


def test_unfinished_shards_and_too_few_shards_are_refused(tmp_path):
    _write_shards(tmp_path / "shards", [2, 2], annotated=False)
    (tmp_path / "shards" / "shard-000001.json").unlink()  # the second tar may still be being written
    plan = training_shards(str(tmp_path))
    assert [s.rel for s in plan.shards] == ["shard-000000.tar"]
    with pytest.raises(DataError, match="each worker needs at least one shard"):
        plan.steps_per_epoch(2, 1)
    with pytest.raises(DataError, match="no finished WebDataset shards"):
        training_shards(str(tmp_path / "empty"))


def test_latest_checkpoint_needs_every_rank(tmp_path):
    run = open_store(str(tmp_path))
    for step, ranks in ((2, (0, 1)), (4, (0,))):  # step 4: rank 1's files never arrived
        name = f"checkpoints/step-{step:08d}"
        run.write(f"{name}/state.json", TrainState(step, 0, step, 2, 1, 1).to_json())
        for r in ranks:
            run.write(f"{name}/ranks/rank-{r}.json", json.dumps({"rank": r}).encode())
    found = latest_checkpoint(run)
    assert found[0] == "step-00000002" and found[1].step == 2


def test_resume_point_rolls_epochs_and_restarts_on_new_geometry():
    def five(epoch):
        return 5

    assert resume_point(None, 2, 1, 1, five) == TrainState(0, 0, 0, 2, 1, 1)
    done = TrainState(step=10, epoch=1, epoch_step=5, world_size=2, batch_size=1, grad_accum=1)
    assert resume_point(done, 2, 1, 1, five) == TrainState(10, 2, 0, 2, 1, 1)
    mid = TrainState(step=7, epoch=1, epoch_step=2, world_size=2, batch_size=1, grad_accum=1)
    assert resume_point(mid, 2, 1, 1, five) == mid
    assert resume_point(mid, 4, 1, 1, five) == TrainState(7, 2, 0, 4, 1, 1)  # the old sample order is gone
    # epochs differ in length once shards are permuted: the rollover asks each epoch its own
    assert resume_point(done, 2, 1, 1, lambda epoch: 3 if epoch == 1 else 4) == TrainState(10, 2, 2, 2, 1, 1)


@pytest.mark.parametrize("stage,precision,offload", [(1, "fp32", False), (2, "bf16", True), (3, "bf16", True)])
def test_deepspeed_config_follows_the_typed_config(stage, precision, offload):
    sets = [f"deepspeed.stage={stage}", f"deepspeed.precision={precision}", f"deepspeed.offload_optimizer={offload}",
            "train.batch_size=3", "train.grad_accum=2", "train.grad_clip=0.5", "deepspeed.extra={wall_clock_breakdown: true}"]
    cfg = load_config(overrides=sets)
    ds = build_deepspeed_config(cfg.train, cfg.deepspeed, world_size=4)
    assert ds["train_batch_size"] == 3 * 2 * 4 and ds["gradient_accumulation_steps"] == 2
    assert ds["zero_optimization"]["stage"] == stage and ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] is (precision == "bf16")
    assert ("offload_optimizer" in ds["zero_optimization"]) is offload
    assert ds["wall_clock_breakdown"] is True  # deepspeed.extra is merged last


def test_config_rejects_what_deepspeed_cannot_do():
    from spasem.config import ConfigError

    with pytest.raises(ConfigError, match="offload_params needs deepspeed.stage=3"):
        load_config(overrides=["deepspeed.offload_params=true", "deepspeed.stage=2"])
    with pytest.raises(ConfigError, match="did you mean 'train.max_steps'"):
        load_config(overrides=["train.max_step=3"])


def test_a_batch_mixing_samples_with_and_without_the_hrs_caption_decodes_with_one_schema():
    """A prepare resumed across ``annotate.captions.low_hr`` leaves shards with and without the HR's quality
    caption: every batch gets the same columns, zeros and ``has_low_hr`` False where a sample has none."""
    import numpy as np

    from training.data import DecodeBatch

    rng = np.random.default_rng(1)
    members = ("text.npy", "text_low_hr.npy", "caption.json")

    def sample(key, low_hr):
        caption = {"high": f"photo {key}", "low": "noisy", "model": "t"} | ({"low_hr": f"clean {key}"} if low_hr else {})
        out = {"__key__": key, "hr.png": encode_png(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)),
               "lr.png": encode_png(rng.integers(0, 255, (4, 4, 3), dtype=np.uint8)),
               "text.npy": encode_npy(rng.standard_normal((2, 77, 8)).astype(np.float16)),
               "caption.json": encode_json(caption)}
        if low_hr:
            out["text_low_hr.npy"] = encode_npy(np.full((77, 8), 0.5, np.float16))
        return out

    decode = DecodeBatch(members, max_boxes=2)
    for flags in ([True, False, True], [False, False], [True, True]):
        rows = [sample(f"k{i}", f) for i, f in enumerate(flags)]
        # a missing optional member arrives as b"", as _read_window yields it
        raw = {name: np.asarray([r.get(name, b"") for r in rows], dtype=object) for name in ("__key__", "hr.png", "lr.png", *members)}
        batch = to_torch(decode(raw))
        assert batch["has_low_hr"].tolist() == flags
        assert batch["caption_low_hr"] == [f"clean k{i}" if f else "" for i, f in enumerate(flags)]
        assert batch["text_low_hr"].shape == (len(flags), 77, 8)
        assert [bool((s == 0.5).all()) for s in batch["text_low_hr"]] == flags
        assert [bool((s == 0).all()) for s in batch["text_low_hr"]] == [not f for f in flags]
    # uncaptioned shards (pairs only) get no caption columns to encode online
    bare = DecodeBatch((), max_boxes=2)({name: raw[name] for name in ("__key__", "hr.png", "lr.png")})
    assert "caption_low_hr" not in bare and "has_low_hr" not in bare
