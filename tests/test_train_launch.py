"""training.launch's failure paths and run bookkeeping, without starting Ray: errors no restart can fix
are found before any worker starts and end in one line and a non-zero exit; relaunches that would
break the checkpoint are refused, safe ones recorded; strict checkpoint loading; the metrics log."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from spasem.config import load_config
from spasem.storage import open_store
from tests.test_train_data import _write_shards
from training.checkpoints import TrainState
from training.relaunch import LAUNCHES, check_relaunch, config_changes
from training.reporting import RunLog, read_metrics


@pytest.fixture
def no_workers(monkeypatch):
    """A launch that gets past its checks would start Ray here: make that a test failure."""
    import training.launch

    def refuse(*args, **kwargs):
        raise AssertionError("the launch reached init_ray: the error was not caught before the workers")

    monkeypatch.setattr(training.launch, "init_ray", refuse)


@pytest.fixture
def shard_dir(tmp_path) -> Path:
    _write_shards(tmp_path / "prepared" / "shards", [2, 2], annotated=False)
    return tmp_path / "prepared"


def _fake_checkpoint(run_dir: Path, step: int, world: int, config_sets: list[str] = ()) -> None:
    """The files a finished checkpoint leaves (state and every rank's marker) and the run's config."""
    run = open_store(str(run_dir))
    name = f"checkpoints/step-{step:08d}"
    run.write(f"{name}/state.json", TrainState(step, 0, step, world, 1, 1).to_json())
    for r in range(world):
        run.write(f"{name}/ranks/rank-{r}.json", json.dumps({"rank": r}).encode())
    cfg = load_config(overrides=list(config_sets))
    run.write("config.yaml", yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False).encode())


def _launch(capsys, shard_dir, out, tiny, *sets: str) -> tuple[int, str]:
    from training.launch import main

    args = ["--input", str(shard_dir), "--output", str(out),
            "--set", f"models.cache_dir={Path(tiny['sd']).parent.parent}", "--set", "train.batch_size=1"]
    for s in sets:
        args += ["--set", s]
    code = main(args)
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) <= 1 and "Traceback" not in "\n".join(errors)
    return code, errors[0] if errors else ""


@pytest.mark.parametrize("sets,cause", [
    (["train.objective=nowhere.at_all:Objective"], "train.objective='nowhere.at_all:Objective' cannot be imported"),
    (["train.ema=true", "deepspeed.stage=3"], "train.ema needs whole parameters on every rank"),
    (["models.profile=sd15", "models.sd=/no/such/model"], "models.sd='/no/such/model' is not a folder"),
    (["models.profile=sd15", "models.sd=nobody/no-such-model"], "not in the local Hugging Face cache"),
])
def test_errors_no_restart_can_fix_end_before_the_workers_in_one_line(
        capsys, shard_dir, tmp_path, tiny, no_workers, sets, cause):
    code, error = _launch(capsys, shard_dir, tmp_path / "run", tiny, *sets)
    assert code == 1 and cause in error, error


def test_missing_shards_and_zero3_worker_change_are_one_line_errors(capsys, shard_dir, tmp_path, tiny, no_workers):
    code, error = _launch(capsys, tmp_path / "nothing-here", tmp_path / "run", tiny)
    assert code == 1 and "no finished WebDataset shards" in error and "pipeline.prepare" in error
    run = tmp_path / "zero3"
    _fake_checkpoint(run, 4, world=2, config_sets=["deepspeed.stage=3", "train.batch_size=1"])
    code, error = _launch(capsys, shard_dir, run, tiny, "deepspeed.stage=3", "train.num_workers=1")
    assert code == 1 and "relaunch with train.num_workers=2" in error


def test_breaking_relaunch_is_refused_naming_every_key(capsys, shard_dir, tmp_path, tiny, no_workers):
    run = tmp_path / "run"
    _fake_checkpoint(run, 4, world=2, config_sets=["train.batch_size=1"])
    code, error = _launch(capsys, shard_dir, run, tiny, "model.attention=lgcaa", "deepspeed.precision=bf16",
                          "train.max_steps=2000")
    assert code == 1 and "step 4" in error
    assert "model.attention: 'standard' -> 'lgcaa'" in error and "deepspeed.precision: 'fp32' -> 'bf16'" in error
    assert "train.max_steps" not in error and not (run / LAUNCHES).exists()


def test_safe_relaunch_is_recorded_and_changed_members_are_refused(tmp_path):
    run = open_store(str(tmp_path))
    first = load_config(overrides=["train.max_steps=10"])
    check_relaunch(run, first, ("latent.npy",), None)
    later = load_config(overrides=["train.max_steps=20", "train.log_every=7", "train.warmup_steps=3",
                                   "model.dropout.text_high=0.2"])
    record = check_relaunch(run, later, ("latent.npy",), 10)
    assert record["from_step"] == 10 and record["changed"] == {
        "model.dropout.text_high": [0.1, 0.2], "train.log_every": [first.train.log_every, 7], "train.max_steps": [10, 20],
        "train.warmup_steps": [0, 3]}
    lines = [json.loads(line) for line in run.read(LAUNCHES).decode().splitlines()]
    assert len(lines) == 2 and yaml.safe_load(run.read("config.yaml"))["train"]["max_steps"] == 20
    from spasem.config import ConfigError

    with pytest.raises(ConfigError, match=r"shard members: \['latent.npy'\] -> \[\]"):
        check_relaunch(run, later, (), 20)  # annotated run relaunched on bare pairs
    assert config_changes({"a": {"b": 1}}, {"a": {"b": 1, "c": 2}}) == {"a.c": (None, 2)}


def test_checkpoint_loading_is_strict_except_for_the_frozen_base():
    from training.runner import CheckpointMismatch, Runner

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    model[0].requires_grad_(False)  # the frozen base: never saved in a checkpoint
    trained = {k: v for k, v in model.state_dict().items() if k.startswith("1.")}
    Runner._load_module(trained, model)
    with pytest.raises(CheckpointMismatch, match=r"1 trainable weights missing \['1.bias'\]"):
        Runner._load_module({"1.weight": trained["1.weight"]}, model)
    with pytest.raises(CheckpointMismatch, match="1 unknown"):
        Runner._load_module({**trained, "2.weight": torch.zeros(2, 2)}, model)


def test_metrics_are_appended_and_a_resume_drops_what_followed_its_checkpoint(tmp_path):
    run = open_store(str(tmp_path))
    log = RunLog(run, 0)
    for step in (1, 2, 3):
        log.log(step, {"loss": 1.0 / step})
        if step == 1:
            first = (tmp_path / "metrics.jsonl").read_bytes()
    log.close()
    assert (tmp_path / "metrics.jsonl").read_bytes().startswith(first)  # appended, never rewritten
    resumed = RunLog(run, 2)  # the checkpoint was at step 2: step 3 is logged again by the new run
    resumed.log(3, {"loss": 0.5})
    resumed.close()
    assert [(m["step"], m["loss"]) for m in read_metrics(run)] == [(1, 1.0), (2, 0.5), (3, 0.5)]


def test_metrics_on_s3_are_one_object_per_step_and_one_file_at_the_end(bucket):
    run = open_store(f"s3://{bucket}/run")
    log = RunLog(run, 0)
    for step in (1, 2):
        log.log(step, {"loss": float(step)})
    assert sorted(run.child("metrics").list()) == ["step-00000001.json", "step-00000002.json"]
    log.close()
    assert [m["step"] for m in read_metrics(run)] == [1, 2]
    assert [json.loads(line)["step"] for line in run.read("metrics.jsonl").decode().splitlines()] == [1, 2]


def test_a_failure_the_restarts_cannot_fix_ends_in_one_line_naming_the_workers_error(
        capsys, shard_dir, tmp_path, tiny, monkeypatch):
    import training.launch

    class Trainer:  # what Ray Train's fit() raises once train.max_failures restarts are spent
        def fit(self):
            raise RuntimeError("Training failed due to worker errors:\n[Rank 0,1 Error Snippet]:\n"
                               "Traceback (most recent call last):\n  File \"loop.py\", line 9, in step\n"
                               "    load()\nCheckpointMismatch: the checkpoint does not fit the model\n")

    monkeypatch.setattr(training.launch, "init_ray", lambda *a, **k: None)
    monkeypatch.setattr(training.launch, "build_trainer", lambda cfg, spec: Trainer())
    code, error = _launch(capsys, shard_dir, tmp_path / "run", tiny, "train.max_failures=2")
    assert code == 1 and error == ("error: training failed after 2 restart(s): CheckpointMismatch: the checkpoint "
                                   "does not fit the model (the full traceback is logged above)")


def test_cpu_runs_leave_deepspeeds_shm_op_unbuilt(monkeypatch):
    """On CPU, gloo does the collectives: DeepSpeed's shared-memory op (a C++ build of 30-50 s, which can
    hang peers on CPUs without AVX-512) must not be built. The patch has to reach the module DeepSpeed
    calls it from, not the ``torch`` package that ``import deepspeed.comm.torch as m`` binds."""
    import importlib

    from training.runner import set_accelerator

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    module = importlib.import_module("deepspeed.comm.torch")
    monkeypatch.setattr(module, "build_shm_op", module.build_shm_op)  # put back after the test
    set_accelerator(False)
    assert module.build_shm_op() is None
    assert not hasattr(torch, "build_shm_op")
