"""What the entry points share about running: the Ray start-up, and how a run ends for the user.

``init_ray`` joins a cluster if one is given, else starts a local one. ``user_errors`` are the
failures a user fixes (a bad path, URI scheme, config value, storage permission): the entry points
print them as one ``error: ...`` line and exit 1 instead of a traceback. ``print_rejects`` is the
summary they print when nothing was produced, before exiting non-zero.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable
from typing import Any, TextIO

from spasem.config import ConfigError, RayConfig
from spasem.storage import StorageError

log = logging.getLogger(__name__)
SHOWN_REJECTS = 10  # the first few sources per run; summary.json has all of them


def init_ray(cfg: RayConfig, progress: bool = True) -> None:
    """Connect to ``ray.address`` / ``RAY_ADDRESS`` (as under ``ray job submit``) or start a local cluster.

    Datasets keep Ray Data's default ``preserve_order=False``: prepare's shard plan fixes which rows
    go where, annotate regroups rows by shard and key, upscale writes each row by its own path. A
    dataset whose consumer needs the order (training's per-worker streams) sets it on itself.
    """
    import ray

    if not ray.is_initialized():
        address = cfg.address or os.environ.get("RAY_ADDRESS")
        if address:
            log.info("joining Ray cluster at %s", address)
            ray.init(address=address, log_to_driver=True)
        else:
            # a laptop cluster has no auth to configure; a real cluster keeps its own setting
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")
            log.info("starting a local Ray cluster (num_cpus=%s)", cfg.num_cpus or "all")
            ray.init(num_cpus=cfg.num_cpus, include_dashboard=False, log_to_driver=True)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = progress


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that name something the user must fix: printed as one line, exit status 1."""
    errors: tuple[type[BaseException], ...] = (FileNotFoundError, NotADirectoryError, ConfigError, StorageError)
    try:  # the s3 extra: credentials, permissions, missing buckets, endpoints that do not answer
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:
        return errors
    return errors + (BotoCoreError, ClientError)


def error_line(exc: BaseException) -> str:
    """``error: <message>`` on one line (botocore messages name the operation and the bucket or key)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"error: {text}"


def find_cause(exc: BaseException, kind: type[BaseException]) -> BaseException | None:
    """``exc`` or the exception of type ``kind`` behind it, or None.

    Ray wraps an actor's error (``RayTaskError(UserCodeException)``), and Ray Data's wrapper keeps only
    the remote traceback as text: there the exception is found by its ``module.Class: message`` line.
    """
    seen: set[int] = set()
    todo: list[Any] = [exc]
    while todo:
        cur = todo.pop()
        if cur is None or id(cur) in seen:
            continue
        seen.add(id(cur))
        if isinstance(cur, kind):
            return cur
        todo += [getattr(cur, "cause", None), cur.__cause__, cur.__context__]
    mark = f"{kind.__module__}.{kind.__qualname__}: "
    for line in reversed(str(exc).splitlines()):
        if line.strip().startswith(mark):
            return kind(line.strip()[len(mark):])
    return None


def print_rejects(what: str, rejects: Iterable[dict[str, Any]], by_reason: dict[str, int],
                  out: TextIO | None = None) -> None:
    """The rejects summary printed when nothing was produced: counts by reason, then the first sources."""
    out = out or sys.stderr
    rows = list(rejects)
    print(f"error: no {what} produced: every input was rejected ({sum(by_reason.values())}: {by_reason})", file=out)
    for row in rows[:SHOWN_REJECTS]:
        print(f"  {row['source']}: {row.get('error') or row['reason']}", file=out)
    if len(rows) > SHOWN_REJECTS:
        print(f"  ... and {len(rows) - SHOWN_REJECTS} more (all of them in summary.json)", file=out)
