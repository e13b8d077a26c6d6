"""training.launch end to end: Ray Train + DeepSpeed ZeRO 1/2/3 with 2 gloo workers on real shards.

One shard set per module (4 shards of 2 samples, 64 px, the last shard held out for validation) and
one uninterrupted ZeRO-2 reference run that the resume and fault tests compare against, loss for loss.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

from pipeline.prepare import main as prepare_main
from spasem.storage import open_store
from tests.conftest import skimage_photo
from training.checkpoints import latest_checkpoint
from training.launch import main as launch_main
from training.reporting import read_metrics

pytestmark = pytest.mark.slow
PHOTOS = ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg")
LOSS_KEYS = ("loss", "diffusion", "degradation_free", "semantic")


def _args(inp, out, *extra: str) -> list[str]:
    sets = ["train.num_workers=2", "train.batch_size=1", "train.cpus_per_worker=0.5", "train.max_steps=4",
            "train.checkpoint_every=2", "train.log_every=1", "train.lr=1e-3", "train.val_shards=1",
            "train.sample_steps=2", "train.num_samples=1", "train.prefetch_batches=1", "ray.num_cpus=4", *extra]
    return ["--input", str(inp), "--output", str(out)] + [a for s in sets for a in ("--set", s)]


@pytest.fixture(scope="module")
def shards(tmp_path_factory, ray_cluster):
    from PIL import Image

    photos = tmp_path_factory.mktemp("photos")
    for name in PHOTOS:
        Image.fromarray(skimage_photo(name)).convert("RGB").save(photos / (Path(name).stem + ".png"))
    out = tmp_path_factory.mktemp("prepared")
    assert prepare_main(["--input", str(photos), "--output", str(out), "--set", "prepare.phases=[shard]",
                         "--set", "data.hr_size=64", "--set", "data.shard_size=2", "--set", "prepare.progress=false"]) == 0
    assert len(list((out / "pairs").glob("shard-*.tar"))) == 4
    return out


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory):
    """An uninterrupted ZeRO-2 run of 4 steps (2 epochs of 2 steps), checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("reference")
    assert launch_main(_args(shards, out, "deepspeed.stage=2")) == 0
    return out


def _by_step(lines: list[dict]) -> dict[int, dict]:
    steps = [m["step"] for m in lines]
    assert len(steps) == len(set(steps)), f"a step was logged twice: {steps}"
    return {m["step"]: m for m in lines}


def _check_trained(out: Path) -> dict[int, dict]:
    metrics = _by_step(read_metrics(open_store(str(out))))
    assert sorted(metrics) == [0, 1, 2, 3, 4]
    for step in (1, 2, 3, 4):
        m = metrics[step]
        assert all(math.isfinite(m[k]) for k in LOSS_KEYS if k in m), m
        assert {"lr", "samples_per_s", "data_wait_share", "grad_norm"} <= set(m)
        assert 0.0 <= m["data_wait_share"] <= 1.0
    # validation uses fixed batches and fixed noise, so its loss is a function of the weights alone
    assert metrics[4]["val/loss"] < metrics[0]["val/loss"], (metrics[0]["val/loss"], metrics[4]["val/loss"])
    found = latest_checkpoint(open_store(str(out)))
    assert found is not None and found[1].step == 4 and found[1].epoch == 1 and found[1].epoch_step == 2
    assert (out / "checkpoints" / found[0] / "config.yaml").exists()
    return metrics


def test_zero2_trains_loss_falls_and_writes_the_run_folder(reference):
    metrics = _check_trained(reference)
    assert {"diffusion", "degradation_free"} <= set(metrics[1])
    assert (reference / "config.yaml").exists() and (reference / "export" / "config.yaml").exists()
    assert json.loads((reference / "export" / "export.json").read_text()) == {"step": 4}
    assert sorted(p.name for p in (reference / "samples").glob("*.png")) == ["step-00000002.png", "step-00000004.png"]
    assert list((reference / "tensorboard").glob("events.out.tfevents.*"))
    state = json.loads((reference / "checkpoints" / "step-00000004" / "state.json").read_text())
    assert state["world_size"] == 2 and state["step"] == 4


@pytest.mark.parametrize("stage", [1, 3])
def test_zero_stage_trains_and_loss_falls(shards, tmp_path, stage):
    out = tmp_path / f"zero{stage}"
    assert launch_main(_args(shards, out, f"deepspeed.stage={stage}", "train.export_with_checkpoint=false")) == 0
    _check_trained(out)
    assert (out / "export" / "model_index.json").exists()  # the final export, gathered from ZeRO-3 slices too


def test_relaunch_resumes_with_same_step_and_identical_losses(reference, shards, tmp_path):
    run = tmp_path / "run"
    assert launch_main(_args(shards, run, "deepspeed.stage=2", "train.max_steps=2",
                                   "train.export_with_checkpoint=false")) == 0
    assert latest_checkpoint(open_store(str(run)))[1].step == 2
    # a new process in real life; here a new Ray Train run on the same --output with a higher step budget
    assert launch_main(_args(shards, run, "deepspeed.stage=2", "train.max_steps=4")) == 0
    ref, resumed = _by_step(read_metrics(open_store(str(reference)))), _by_step(read_metrics(open_store(str(run))))
    assert sorted(resumed) == [0, 1, 2, 3, 4]
    for step in (3, 4):  # step 3 is the first step after the relaunch: same weights, same samples, same noise
        for key in LOSS_KEYS + ("val/loss",):
            if key in ref[step]:
                assert resumed[step][key] == ref[step][key], (step, key, resumed[step][key], ref[step][key])
    assert latest_checkpoint(open_store(str(run)))[1].step == 4
    # fewer workers: ZeRO-2's per-rank optimizer partitions no longer fit, the weights and the step do
    assert launch_main(_args(shards, run, "deepspeed.stage=2", "train.max_steps=5", "train.num_workers=1",
                             "train.export_with_checkpoint=false")) == 0
    found = latest_checkpoint(open_store(str(run)))[1]
    assert (found.step, found.world_size) == (5, 1)
    assert math.isfinite(_by_step(read_metrics(open_store(str(run))))[5]["loss"])


def test_injected_fault_is_survived_with_checkpoints_on_s3(reference, shards, bucket, monkeypatch):
    monkeypatch.setenv("PIPELINE_FAULT_AT_STEP", "3")
    uri = f"s3://{bucket}/runs/faulty"
    assert launch_main(_args(shards, uri, "deepspeed.stage=2", "train.max_failures=1",
                                  "train.export_with_checkpoint=false")) == 0
    run = open_store(uri)
    assert run.exists("faults/step-00000003.json")  # the fault really fired, once
    files = set(run.list())
    for step in (2, 4):
        assert f"checkpoints/step-{step:08d}/state.json" in files
        assert f"checkpoints/step-{step:08d}/deepspeed/zero_pp_rank_1_mp_rank_00_optim_states.pt" in files
    assert "export/model_index.json" in files and "metrics.jsonl" in files
    ref, faulty = _by_step(read_metrics(open_store(str(reference)))), _by_step(read_metrics(run))
    assert sorted(faulty) == [0, 1, 2, 3, 4]
    # restarted from the step-2 checkpoint, the data stream and the losses continue as if nothing happened
    for step in (3, 4):
        assert faulty[step]["loss"] == ref[step]["loss"], (step, faulty[step]["loss"], ref[step]["loss"])
    # credentials never reach what the run writes (configs, metrics, markers)
    secret = os.environ["AWS_SECRET_ACCESS_KEY"].encode()
    for name in files:
        if name.endswith((".yaml", ".json", ".jsonl")):
            assert secret not in run.read(name), name


def test_export_loads_into_the_one_image_pipeline(reference, shards):
    import torch

    from spasem.model.sr_pipeline import SpatialSemanticSRPipeline
    from spasem.shards import decode_member, read_tar

    pipe = SpatialSemanticSRPipeline.from_pretrained(str(reference / "export"))
    _, members = read_tar((shards / "pairs" / "shard-000000.tar").read_bytes())[0]
    lr = decode_member("lr.png", members["lr.png"])
    out = pipe(lr, prompt="a photo", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
               output_type="np")
    out = np.asarray(out)
    assert out.shape == (64, 64, 3) and np.isfinite(out).all()
    # the exported ControlNet is the trained one, not the zero-initialized start
    ckpt = torch.load(reference / "checkpoints" / "step-00000004" / "deepspeed" / "mp_rank_00_model_states.pt",
                      map_location="cpu", weights_only=False)["module"]
    exported = pipe.controlnet.state_dict()
    trained = {k[len("controlnet."):]: v for k, v in ckpt.items() if k.startswith("controlnet.")}
    assert trained and all(torch.equal(exported[k].float(), v.float()) for k, v in trained.items())
