"""Ray start-up shared by the entry points: join a cluster if one is given, else start a local one."""

from __future__ import annotations

import logging
import os

from spasem.config import RayConfig

log = logging.getLogger(__name__)


def init_ray(cfg: RayConfig, progress: bool = True) -> None:
    """Connect to ``ray.address`` / ``RAY_ADDRESS`` (as under ``ray job submit``) or start a local cluster."""
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
    ctx.execution_options.preserve_order = True
