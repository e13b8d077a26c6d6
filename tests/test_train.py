"""training.launch end to end: Ray Train + DeepSpeed ZeRO 2 and 3 with 2 gloo workers on real shards.

One shard set per module, prepared the way a real run prepares it (every phase: captions, boxes,
CLIP/DINOv2 features, text states and latents in the shards; 4 shards of 2 samples, 64 px, the last
held out for validation), and one uninterrupted ZeRO-2 reference run that the relaunched run (on S3,
with a fault injected after the relaunch) is compared against, loss for loss and key for key. ZeRO-3 on the bare pairs (everything computed online,
the weights partitioned across workers and gathered for the export) is trained in
tests/test_multinode.py, one worker on each of two Ray nodes. ZeRO-1 differs from ZeRO-2 only inside
DeepSpeed's gradient partitioning: no run of its own. Faults and probes enter from the test side through ``instrumented``, a
wrapper around the production ``train_loop_per_worker``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

from pipeline.prepare import main as prepare_main
from spasem.storage import download_tree, open_store
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
    assert prepare_main(["--input", str(photos), "--output", str(out), "--set", "data.hr_size=64",
                         "--set", "data.shard_size=2", "--set", "prepare.progress=false"]) == 0
    assert len(list((out / "shards").glob("shard-*.tar"))) == 4
    return out


def instrumented(record: Path, fault_at_step: int | None = None):
    """``train_loop_per_worker`` wrapped for tests: each rank appends ``{rank, step, keys}`` to ``record``
    before every step; the online encoders raise while a step or a validation runs, so a run on annotated
    shards proves it used the shards' members; ``fault_at_step``: the last rank raises once, before that
    step (a marker file beside ``record`` makes "once" survive the restart). Built at run time, so
    cloudpickle ships it by value to the Ray Train workers."""
    from training.loop import train_loop_per_worker

    marker = f"{record}.fault"

    def loop(config):
        import spasem.encoders
        import training.objective
        from training.runner import Runner

        active = []

        def forbidden(name, real):
            def spy(*args, **kwargs):
                prompts = args[2] if name == "encode_prompts" and len(args) > 2 else None
                if active and prompts != [""]:  # the empty prompt (caption dropout) is computed once, on purpose
                    raise AssertionError(f"{name} ran online although the shards carry its output")
                return real(*args, **kwargs)
            return spy

        for name in ("encode_prompts", "vae_posterior"):
            setattr(training.objective, name, forbidden(name, getattr(training.objective, name)))
        encode = spasem.encoders.ImageEncoders.encode
        spasem.encoders.ImageEncoders.encode = forbidden("ImageEncoders.encode", encode)
        condition_on_hr = training.objective.SRObjective.condition_on_hr

        def allowed_hr_tokens(self, *args, **kwargs):
            # model.original_image_ratio: the HR's visual tokens are computed online on purpose (the shards
            # store the LR's); everything else in the step still must come from the shards
            held = active[:]
            active.clear()
            try:
                return condition_on_hr(self, *args, **kwargs)
            finally:
                active.extend(held)

        training.objective.SRObjective.condition_on_hr = allowed_hr_tokens
        train_step, validate = Runner.train_step, Runner.validate

        def step(self, micro):
            number = self.state.step + 1
            if number == fault_at_step and self.rank == self.world_size - 1 and not os.path.exists(marker):
                Path(marker).write_text(str(number))
                raise RuntimeError(f"injected fault before step {number}")
            with open(record, "a") as fh:
                fh.write(json.dumps({"rank": self.rank, "step": number, "keys": [k for b in micro for k in b["key"]]}) + "\n")
            active.append(1)
            try:
                return train_step(self, micro)
            finally:
                active.pop()

        def checked_validate(self, batches):
            active.append(1)
            try:
                return validate(self, batches)
            finally:
                active.pop()

        Runner.train_step, Runner.validate = step, checked_validate
        train_loop_per_worker(config)

    return loop


def launch(argv: list[str], record: Path | None = None, fault_at_step: int | None = None) -> int:
    """``training.launch`` with the instrumented loop when ``record`` is given."""
    import training.launch

    if record is None:
        return launch_main(argv)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(training.launch, "train_loop_per_worker", instrumented(record, fault_at_step))
        return launch_main(argv)


def keys_by_step(record: Path) -> dict[tuple[int, int], list[str]]:
    """(rank, step) -> the sample keys of that step; a step redone after a restart keeps its last record."""
    out = {}
    for line in record.read_text().splitlines():
        entry = json.loads(line)
        out[(entry["rank"], entry["step"])] = entry["keys"]
    return out


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory):
    """An uninterrupted ZeRO-2 run of 4 steps (2 epochs of 2 steps), checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("reference")
    assert launch(_args(shards, out, "deepspeed.stage=2"), record=out.parent / "reference-keys.jsonl") == 0
    return out


def reference_keys(reference: Path) -> dict[tuple[int, int], list[str]]:
    return keys_by_step(reference.parent / "reference-keys.jsonl")


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


def test_zero2_trains_on_the_annotated_shards_loss_falls_and_writes_the_run_folder(reference, shards):
    metrics = _check_trained(reference)
    assert {"diffusion", "degradation_free", "semantic"} <= set(metrics[1])
    # the instrumented loop's encoders raise inside steps: the run trained on the shards' own members
    keys = reference_keys(reference)
    assert sorted(keys) == [(r, s) for r in (0, 1) for s in (1, 2, 3, 4)]
    launches = [json.loads(line) for line in (reference / "launches.jsonl").read_text().splitlines()]
    assert {"latent.npy", "text.npy", "clip_lr.npy", "dino_hr.npy"} <= set(launches[0]["members"])
    # within an epoch no sample twice (2 workers x 2 steps x batch 1 of the 6 training samples: the
    # smallest stream sets the epoch's length), and the two epochs come in different orders
    epochs = [[k for r in (0, 1) for s in (2 * e + 1, 2 * e + 2) for k in keys[(r, s)]] for e in (0, 1)]
    for seen in epochs:
        assert len(seen) == len(set(seen)) == 4
    assert epochs[0] != epochs[1]
    assert (reference / "config.yaml").exists() and (reference / "export" / "config.yaml").exists()
    assert json.loads((reference / "export" / "export.json").read_text()) == {"step": 4}
    card = (reference / "export" / "README.md").read_text()  # the model card: steps, data, base, licence
    assert "for 4 optimizer steps" in card and "6 samples in 3 WebDataset shards" in card
    assert "license: other" in card and "random-init tiny test models" in card and "train:\n" in card
    # the default export: the trained ControlNet and a reference to the base models, no frozen weights
    export = reference / "export"
    assert sorted(p.name for p in export.iterdir()) == ["README.md", "config.yaml", "controlnet", "export.json",
                                                         "spasem_export.json"]
    assert json.loads((export / "spasem_export.json").read_text())["models"]["profile"] == "tiny"
    assert sorted(p.name for p in (reference / "samples").glob("*.png")) == ["step-00000002.png", "step-00000004.png"]
    assert list((reference / "tensorboard").glob("events.out.tfevents.*"))
    state = json.loads((reference / "checkpoints" / "step-00000004" / "state.json").read_text())
    assert state["world_size"] == 2 and state["step"] == 4


def test_relaunch_and_a_fault_resume_on_s3_with_same_samples_and_identical_losses(reference, shards, bucket,
                                                                                      tmp_path):
    """A run on S3 stopped at step 2, relaunched to step 4 with a fault injected before step 3: the
    relaunch resumes from the first launch's checkpoint, the restart after the fault from it again, and
    the run sees the uninterrupted run's samples and losses step for step."""
    uri, record = f"s3://{bucket}/runs/relaunched", tmp_path / "keys.jsonl"
    run = open_store(uri)
    assert launch(_args(shards, uri, "deepspeed.stage=2", "train.max_steps=2",
                        "train.export_with_checkpoint=false"), record) == 0
    assert latest_checkpoint(run)[1].step == 2
    # a new process in real life; here a new Ray Train run on the same --output with a higher step budget,
    # exporting the self-contained pipeline this time (a safe change: nothing in the checkpoint depends on it)
    assert launch(_args(shards, uri, "deepspeed.stage=2", "train.max_steps=4", "train.export_full=true",
                        "train.max_failures=1"), record, fault_at_step=3) == 0
    assert Path(f"{record}.fault").read_text() == "3"  # the fault really fired, once
    # interrupted, relaunched and restarted, the run saw exactly the key sequence of the uninterrupted one
    assert keys_by_step(record) == reference_keys(reference)
    launches = [json.loads(line) for line in run.read("launches.jsonl").decode().splitlines()]
    assert launches[1]["from_step"] == 2 and launches[1]["changed"]["train.max_steps"] == [2, 4]
    ref, resumed = _by_step(read_metrics(open_store(str(reference)))), _by_step(read_metrics(run))
    assert sorted(resumed) == [0, 1, 2, 3, 4]
    for step in (3, 4):  # step 3 is the first step after the relaunch: same weights, same samples, same noise
        for key in LOSS_KEYS + ("val/loss",):
            if key in ref[step]:
                assert resumed[step][key] == ref[step][key], (step, key, resumed[step][key], ref[step][key])
    files = set(run.list())
    for step in (2, 4):
        assert f"checkpoints/step-{step:08d}/state.json" in files
        assert f"checkpoints/step-{step:08d}/deepspeed/zero_pp_rank_1_mp_rank_00_optim_states.pt" in files
    assert {"export/spasem_export.json", "export/controlnet/diffusion_pytorch_model.safetensors", "metrics.jsonl",
            "export/README.md", "export/model_index.json"} <= files
    download_tree(run.child("export"), tmp_path / "export")
    _same_model_in_both_layouts(reference / "export", tmp_path / "export")
    # credentials never reach what the run writes (configs, metrics, markers)
    secret = os.environ["AWS_SECRET_ACCESS_KEY"].encode()
    for name in files:
        if name.endswith((".yaml", ".json", ".jsonl")):
            assert secret not in run.read(name), name
    # fewer workers: ZeRO-2's per-rank optimizer partitions no longer fit, the weights and the step do
    assert launch_main(_args(shards, uri, "deepspeed.stage=2", "train.max_steps=5", "train.num_workers=1",
                             "train.export_with_checkpoint=false")) == 0
    found = latest_checkpoint(run)[1]
    assert (found.step, found.world_size) == (5, 1)
    assert math.isfinite(_by_step(read_metrics(run))[5]["loss"])


def _same_model_in_both_layouts(default: Path, full: Path) -> None:
    """The uninterrupted run's default export and the relaunched run's full export (same steps, samples
    and seeds) hold the same ControlNet and upscale an image to the same pixels; the full one loads alone."""
    import torch

    from spasem.config import load_config
    from spasem.model.controlnet import SpatialSemanticControlNet
    from stages.diffuse import Diffuser
    from tests.test_upscale import _diffuse_row

    assert not (default / "model_index.json").exists() and (full / "model_index.json").is_file()
    assert all((full / part).is_dir() for part in ("unet", "vae", "text_encoder", "clip_vision", "dino"))
    a, b = (SpatialSemanticControlNet.from_pretrained(str(f / "controlnet")).state_dict() for f in (default, full))
    assert all(torch.equal(a[k], b[k]) for k in a)
    cfg = load_config()
    fast = cfg.upscale.model_copy(update={"steps": 2, "tile_size": 16, "tile_overlap": 4, "scale": 2})
    lr = (np.arange(20 * 28 * 3) % 251).astype(np.uint8).reshape(20, 28, 3)
    outs = [Diffuser(fast, cfg.models, str(f))(_diffuse_row(lr, "x.png"))["sr"][0] for f in (default, full)]
    assert outs[0].shape == (40, 56, 3)
    np.testing.assert_array_equal(outs[0], outs[1])


def test_export_loads_into_the_one_image_pipeline(reference, shards):
    import torch

    from spasem.model.sr_pipeline import load_sr_pipeline
    from spasem.shards import decode_member, read_tar

    pipe = load_sr_pipeline(str(reference / "export"))  # the base models resolved here, from the reference
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


@pytest.fixture(scope="module")
def features(shards, tmp_path_factory):
    """One run that trains every optional feature together: EMA, optimizer offload, 2 micro-steps per step,
    warm-up, validation every step, a sample grid every step and one checkpoint kept. Returns
    (run folder, run_training's summary, the recorded keys)."""
    import training.launch
    from spasem.config import load_config

    out = tmp_path_factory.mktemp("features")
    record = out.parent / "features-keys.jsonl"
    sets = [a for a in _args(shards, out, "train.ema=true", "train.ema_decay=0.5", "deepspeed.offload_optimizer=true",
                                "train.grad_accum=2", "train.warmup_steps=2", "train.max_steps=3",
                                "train.validate_every=1", "train.sample_every=1", "train.keep_checkpoints=1",
                                "train.max_failures=0")[4:] if a != "--set"]
    cfg = load_config(overrides=sets, input=str(shards), output=str(out))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(training.launch, "train_loop_per_worker", instrumented(record))
        summary = training.launch.run_training(cfg)
    return out, summary, keys_by_step(record)


def test_ema_offload_accumulation_warmup_validation_samples_and_rotation_train(features):
    import torch
    from safetensors.torch import load_file

    from spasem.model.controlnet import SpatialSemanticControlNet

    out, summary, keys = features
    metrics = _by_step(read_metrics(open_store(str(out))))
    assert sorted(metrics) == [0, 1, 2, 3]
    # warm-up: the rate each step applied climbs to train.lr over 2 steps
    assert metrics[1]["lr"] < metrics[2]["lr"] == metrics[3]["lr"] == pytest.approx(1e-3)
    for step in (1, 2, 3):
        assert math.isfinite(metrics[step]["loss"]) and math.isfinite(metrics[step]["val/loss"])
        assert all(len(keys[(r, step)]) == 2 for r in (0, 1))  # 2 micro-batches of 1 per optimizer step
    # every step's grid, rendered by that step's export; only the newest checkpoint is kept
    assert sorted(p.name for p in (out / "samples").glob("*.png")) == [f"step-0000000{s}.png" for s in (1, 2, 3)]
    assert [p.name for p in (out / "checkpoints").glob("step-*")] == ["step-00000003"]
    ckpt = out / "checkpoints" / "step-00000003"
    assert list((ckpt / "deepspeed").glob("*optim_states.pt"))  # the offloaded optimizer state is saved too
    # the export carries the EMA weights, not the raw ones
    ema = {k[len("controlnet."):]: v for k, v in load_file(str(ckpt / "ema.safetensors")).items()
           if k.startswith("controlnet.")}
    assert ema
    raw = torch.load(ckpt / "deepspeed" / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    exported = SpatialSemanticControlNet.from_pretrained(str(out / "export" / "controlnet")).state_dict()
    assert all(torch.equal(exported[k].float(), v.float()) for k, v in ema.items())
    assert any(not torch.equal(raw[f"controlnet.{k}"].float(), v.float()) for k, v in ema.items())
    # the metrics reached Ray Train's Result (and so any Ray integration: MLflow, W&B, ...)
    assert summary["metrics"]["step"] == 3 and math.isfinite(summary["metrics"]["val/loss"])


def test_relaunch_that_would_break_the_checkpoint_is_refused_naming_the_keys(reference, shards, capsys):
    saved = (reference / "config.yaml").read_text()
    assert launch_main(_args(shards, reference, "deepspeed.stage=2", "model.fusion=attention",
                             "train.max_steps=6")) == 1
    err = capsys.readouterr().err
    assert "model.fusion: 'gated' -> 'attention'" in err and "train.max_steps" not in err
    assert (reference / "config.yaml").read_text() == saved  # nothing recorded, nothing trained
    assert latest_checkpoint(open_store(str(reference)))[1].step == 4
