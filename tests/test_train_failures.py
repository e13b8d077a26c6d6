"""Worker failures that no restart can fix end the run after the first attempt, in one line.

Ray Train restarts the worker group ``train.max_failures`` times whatever failed; the project's
failure policy (training/failures.py) raises at once when a worker's error is one of the
deterministic kinds (a bad config, a shard that cannot feed the run, a checkpoint that does not fit
the model), and leaves everything else (a lost node, a transient storage error) to Ray's restarts.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from spasem.config import ConfigError
from training.data import DataError
from training.failures import NoRetryOnDeterministic, deterministic_cause


def _decision(*failures: BaseException, max_failures: int = 2) -> str:
    from ray.train import FailureConfig
    from ray.train.v2.api.exceptions import WorkerGroupError

    policy = NoRetryOnDeterministic(FailureConfig(max_failures=max_failures))
    error = WorkerGroupError("worker errors", dict(enumerate(failures)))
    return policy.make_decision(error).name


def test_deterministic_worker_errors_are_raised_the_rest_retried():
    assert _decision(RuntimeError("connection reset by peer")) == "RETRY"
    assert _decision(OSError("SlowDown: please reduce your request rate")) == "RETRY"
    # one rank's deterministic error decides, whatever the other ranks died of meanwhile
    assert _decision(RuntimeError("gloo: connection closed"), DataError("sample 'a' lacks latent.npy")) == "RAISE"
    assert _decision(ConfigError("model.fusion='sum' is unknown")) == "RAISE"
    # wrapped the way Ray Data hands a reader's error to the worker: found behind the wrapper, or by its text
    wrapped = RuntimeError("read failed")
    wrapped.__cause__ = DataError("shard-000001.tar is truncated")
    assert _decision(wrapped) == "RAISE"
    text_only = RuntimeError("Traceback ...\ntraining.data.DataError: shard-000001.tar is truncated")
    assert isinstance(deterministic_cause(text_only), DataError)
    # the retry budget still applies to the retryable ones
    assert _decision(RuntimeError("node lost"), max_failures=0) == "RAISE"


def _failing_loop(entries: Path):
    """``train_loop_per_worker`` that records each start and then fails as a corrupt shard would."""

    def loop(config):
        with open(entries, "a") as fh:
            fh.write("start\n")
        raise DataError("sample 'x' under the test shards lacks hr.png")

    return loop


@pytest.mark.slow
def test_a_deterministic_worker_error_is_not_restarted(ray_cluster, tmp_path, tiny, capsys, monkeypatch):
    import training.launch
    from tests.test_train_data import _write_shards

    _write_shards(tmp_path / "prepared" / "shards", [2, 2], annotated=False)
    entries = tmp_path / "entries.txt"
    monkeypatch.setattr(training.launch, "train_loop_per_worker", _failing_loop(entries))
    sets = ["train.num_workers=1", "train.batch_size=1", "train.cpus_per_worker=0.5", "train.max_failures=3",
            "train.max_steps=2", f"models.cache_dir={Path(tiny['sd']).parent.parent}"]
    code = training.launch.main(["--input", str(tmp_path / "prepared"), "--output", str(tmp_path / "run"),
                                 *[a for s in sets for a in ("--set", s)]])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 1
    assert entries.read_text().count("start") == 1, "the worker group was restarted for a deterministic error"
    assert errors == ["error: training stopped without a restart (every restart would fail the same way): "
                      "DataError: sample 'x' under the test shards lacks hr.png"]
