"""Which worker failures Ray Train restarts, and which end the run at once.

Ray Train's default policy restarts the worker group ``train.max_failures`` times whatever failed. A
restart helps with what the world did (a node lost, a preempted spot instance, a flaky network, an
S3 503 that outlived the retries) and never with what the run itself is: a config the model cannot
be built from, a checkpoint that does not fit the model, a shard missing a member. Those fail again
at the same place on every restart, after minutes of start-up each, and bury the cause under Ray's
tracebacks. Most of them are found before any worker starts (``training.launch.preflight``); the
ones only a worker can see are raised as one of ``DETERMINISTIC`` and :class:`NoRetryOnDeterministic`
answers RAISE for them, so ``fit()`` returns after the first attempt with the worker's exception.

The policy plugs in where Ray Train v2's trainer builds its default one (``failure_policy`` of
``_initialize_and_run_controller``, Ray 2.60's controller entry): there is no public hook for it yet.
If a Ray release moves that entry, :func:`trainer_class` falls back to the plain ``TorchTrainer``
and the run keeps Ray's restart-everything behaviour (logged), losing only the early exit.
"""

from __future__ import annotations

import logging

from ray.train.torch import TorchTrainer

from spasem.config import ConfigError
from stages.runtime import find_cause
from training.data import DataError
from training.runner import CheckpointMismatch

log = logging.getLogger(__name__)
# raised in a worker, these repeat on every restart: the config, the checkpoint or the shards are wrong
DETERMINISTIC: tuple[type[BaseException], ...] = (ConfigError, DataError, CheckpointMismatch, ImportError)


def deterministic_cause(error: BaseException) -> BaseException | None:
    """The exception behind ``error`` that no restart can fix (searched through Ray's wrappers), or None."""
    for failure in getattr(error, "worker_failures", {}).values() or [error]:
        for kind in DETERMINISTIC:
            found = find_cause(failure, kind)
            if found is not None:
                return found
    return None


try:  # Ray Train v2's policy interface (Ray 2.60); not public yet, hence the fallback
    from ray.train.v2._internal.execution.failure_handling import DefaultFailurePolicy, FailureDecision
except ImportError:  # pragma: no cover - another Ray release
    DefaultFailurePolicy = FailureDecision = None


if DefaultFailurePolicy is not None:

    class NoRetryOnDeterministic(DefaultFailurePolicy):
        """Ray's default policy, except that a worker failure in ``DETERMINISTIC`` is raised at once."""

        def make_decision(self, training_failed_error):
            cause = deterministic_cause(training_failed_error)
            if cause is not None:
                log.error("not restarting the workers: %s: %s (the same error would end every restart)",
                          type(cause).__name__, cause)
                return FailureDecision.RAISE
            return super().make_decision(training_failed_error)


class PolicyTrainer(TorchTrainer):
    """``TorchTrainer`` with :class:`NoRetryOnDeterministic` in place of Ray's default failure policy."""

    def _initialize_and_run_controller(self, **controller_init_kwargs):
        controller_init_kwargs["failure_policy"] = NoRetryOnDeterministic(self.run_config.failure_config)
        return super()._initialize_and_run_controller(**controller_init_kwargs)


def trainer_class() -> type[TorchTrainer]:
    """:class:`PolicyTrainer`, or the plain ``TorchTrainer`` where this Ray has no policy hook (logged)."""
    if DefaultFailurePolicy is None or not callable(getattr(TorchTrainer, "_initialize_and_run_controller", None)):
        log.warning("this Ray version has no FailurePolicy hook: deterministic worker errors are restarted too")
        return TorchTrainer
    return PolicyTrainer
