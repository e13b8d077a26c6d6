"""Rank 0's run log: RUN_URI/metrics.jsonl, TensorBoard event files and LR | output | HR sample grids.

``metrics.jsonl`` holds one JSON object per logged step (``step``, every loss term, ``lr``,
``samples_per_s``, ``data_wait_share``, ...). Lines are appended, never rewritten, so what a long run
writes grows with its length: locally each line is appended to the file; on S3 (no appends) each
logged step is its own small object ``metrics/step-NNNNNNNN.json`` and ``metrics.jsonl`` is written
once when the run ends. A resumed run drops the lines past its checkpoint once at start (a relaunch
logs those steps again), so the log always reads as one uninterrupted run. TensorBoard writes to a
local folder that is mirrored into RUN_URI/tensorboard/ at checkpoints and at the end.
"""

from __future__ import annotations

import io
import json
import logging
import math
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from spasem.pixels import signed_to_hwc
from spasem.storage import LocalStore, Store

log = logging.getLogger(__name__)
METRICS = "metrics.jsonl"
SEGMENTS = "metrics"  # S3: one object per logged step
TENSORBOARD = "tensorboard"
SAMPLES = "samples"


def read_metrics(run: Store) -> list[dict[str, Any]]:
    """The logged steps of RUN_URI, in step order: metrics.jsonl plus any per-step objects under metrics/
    (the newer object wins for a step in both); empty when nothing was logged."""
    by_step: dict[int, dict[str, Any]] = {}
    if run.exists(METRICS):
        for line in run.read(METRICS).decode().splitlines():
            if line.strip():
                m = json.loads(line)
                by_step[int(m.get("step", 0))] = m
    for rel in run.child(SEGMENTS).list((".json",)):
        m = json.loads(run.child(SEGMENTS).read(rel))
        by_step[int(m.get("step", 0))] = m
    return [by_step[k] for k in sorted(by_step)]


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them visible instead of invalid
    return value


class RunLog:
    """metrics.jsonl + TensorBoard for rank 0, continuing after ``start_step`` on resume."""

    def __init__(self, run: Store, start_step: int):
        self.run = run
        self.local = isinstance(run, LocalStore)
        self.start_step = start_step
        old = read_metrics(run)
        self.lines = [m for m in old if int(m.get("step", 0)) <= start_step]
        if self.local and len(self.lines) != len(old) or not self.local and run.exists(METRICS):
            self._rewrite()  # once per launch: drop what the interrupted run logged past its checkpoint
        if self.local:
            self._tb_local, self._mirror = run.root / TENSORBOARD, False
        else:
            self._tb_local, self._mirror = Path(tempfile.mkdtemp(prefix="tb-")), True
        self._writer = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self._tb_local), purge_step=start_step + 1 if start_step else None)
        except ImportError:  # tensorboard is a dependency; a stripped install still trains
            log.warning("tensorboard is not installed: no TensorBoard logs")

    def _rewrite(self) -> None:
        self.run.write(METRICS, "".join(json.dumps(m, sort_keys=True) + "\n" for m in self.lines).encode())

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Append one line to the metrics log and one scalar per metric to TensorBoard."""
        line = {"step": step, **{k: _clean(v) for k, v in sorted(metrics.items())}}
        self.lines.append(line)
        text = json.dumps(line, sort_keys=True)
        if self.local:
            path = self.run.root / METRICS
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a") as fh:
                fh.write(text + "\n")
        else:
            self.run.child(SEGMENTS).write(f"step-{step:08d}.json", text.encode())
        if self._writer is not None:
            for name, value in metrics.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self._writer.add_scalar(name, value, step)
            self._writer.flush()

    def sync(self) -> None:
        """Mirror the TensorBoard files to S3 (at checkpoints and at the end, not at every log line)."""
        if not self._mirror:
            return
        target = self.run.child(TENSORBOARD)
        for path in sorted(self._tb_local.rglob("*")):
            if path.is_file():
                target.write(path.relative_to(self._tb_local).as_posix(), path.read_bytes())

    def add_image(self, tag: str, image: np.ndarray, step: int) -> None:
        if self._writer is not None:
            self._writer.add_image(tag, image, step, dataformats="HWC")
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self.sync()
        if not self.local:  # the whole log as one file too, once
            self._rewrite()


def sample_grid(lr: np.ndarray, output: np.ndarray, hr: np.ndarray) -> np.ndarray:
    """Rows of LR (nearest-upsampled to HR size) | output | HR, uint8 ``[B*H, 3*W, 3]``."""
    rows = []
    for low, out, high in zip(lr, output, hr, strict=True):
        h, w = high.shape[:2]
        up = np.asarray(Image.fromarray(low).resize((w, h), Image.NEAREST))
        out = np.asarray(Image.fromarray(out).resize((w, h), Image.BICUBIC)) if out.shape[:2] != (h, w) else out
        rows.append(np.concatenate([up, out, high], axis=1))
    return np.concatenate(rows, axis=0)


def write_png(run: Store, rel: str, image: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    run.write(rel, buf.getvalue())
    return run.url(rel)


def render_samples(pipeline: Any, batch: dict[str, Any], num: int, steps: int, seed: int) -> np.ndarray:
    """Upscale the first ``num`` LR images of ``batch`` with ``pipeline``; returns the sample grid."""
    import torch

    lr = signed_to_hwc(batch["lr"][:num])
    hr = signed_to_hwc(batch["hr"][:num])
    outputs = []
    for i in range(len(lr)):
        phrases = batch["phrases"][i] if "phrases" in batch else None
        boxes = None
        if phrases:
            boxes = batch["boxes"][i][: len(phrases)].detach().float().cpu().numpy().tolist()
        out = pipeline(
            lr[i], prompt=batch["caption_high"][i], prompt_low=batch["caption_low"][i], phrases=phrases or None,
            boxes=boxes, num_inference_steps=steps, generator=torch.Generator("cpu").manual_seed(seed + i),
            output_type="np", upscale=hr.shape[1] // lr.shape[1],
        )
        image = np.asarray(out.images[0] if hasattr(out, "images") else out)
        if image.dtype != np.uint8:
            image = np.clip(image * 255.0, 0, 255).round().astype(np.uint8)
        outputs.append(image)
    return sample_grid(lr, np.stack(outputs), hr)
