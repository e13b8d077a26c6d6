"""``python -m pipeline.prepare``: HR corpora -> degraded pairs -> annotated WebDataset shards.

Phases (``prepare.phases``): ``shard`` writes ``OUT/pairs/`` (HR, LR, record), ``annotate`` adds
captions, boxes, embeddings, text states and latents and writes the final ``OUT/shards/``. Both
resume at shard granularity: a shard whose done marker exists is skipped.

Every file under the input is accounted for in ``summary.json``: a sample, a reject with a reason, or
a count in ``skipped_by_extension``. Exit status 1 when no sample was produced (every input rejected:
the rejects are printed) and on user errors (a missing folder, an unknown URI scheme, a storage
permission), each as one ``error: ...`` line.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

from pipeline.annotate_phase import run_annotate_phase
from pipeline.shard_phase import plan_shards, run_shard_phase
from spasem.config import Config, build_parser, config_to_yaml, parse_cli, sample_photos
from spasem.profiles import announce_tiny
from spasem.shards import PAIRS_DIR, done_indices, load_marker
from spasem.storage import Store
from stages.read import list_images
from stages.runtime import error_line, init_ray, print_rejects, user_errors

log = logging.getLogger("pipeline.prepare")
DEFAULT_OUTPUT = "runs/prepare"


def list_inputs(cfg: Config) -> tuple[list[str], dict[str, int]]:
    """(image files, {extension: count} of the other files) under ``--input``."""
    suffixes = cfg.data.suffixes
    files, others = list_images(cfg.storage.open(cfg.input), suffixes)
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(suffixes)}) found under {cfg.input}"
                                + (f"; other files by extension: {others}" if others else ""))
    return files, others


def _aggregate(store: Store, indices: list[int]) -> dict[str, Any]:
    markers = [load_marker(store, i) for i in indices]
    reasons = Counter(r["reason"] for m in markers for r in m["rejected"])
    return {
        "rejects": sorted((r for m in markers for r in m["rejected"]), key=lambda r: r["source"]),
        "shards": len(markers),
        "samples": sum(m["count"] for m in markers),
        "rejected": sum(reasons.values()),
        "rejected_by_reason": dict(sorted(reasons.items())),
        "bytes": sum(m["bytes"] for m in markers),
    }


def _stage_throughput(results: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    seconds: Counter = Counter()
    for r in results:
        seconds.update(r.get("seconds", {}))
    samples = sum(r["count"] for r in results)
    return {
        name: {"seconds": round(sec, 3), "samples_per_s": round(samples / sec, 2) if sec > 0 else None}
        for name, sec in sorted(seconds.items())
    }


def run_prepare(cfg: Config) -> dict[str, Any]:
    """Run the configured phases and write ``OUT/config.yaml`` and ``OUT/summary.json``."""
    announce_tiny(cfg.models, cfg.input, "pipeline.prepare")
    start = time.time()
    files, others = list_inputs(cfg)  # before Ray starts: a bad input URI is one line, not a cluster start
    out = cfg.storage.open(cfg.output)
    out.write("config.yaml", config_to_yaml(cfg).encode())
    init_ray(cfg.ray, cfg.prepare.progress)
    plan = plan_shards(files, cfg.data.shard_size, cfg.data.crops_per_image)
    summary: dict[str, Any] = {"input": cfg.input, "output": cfg.output, "files": len(files),
                               "skipped_by_extension": others, "phases": {}}
    pairs = out.child(PAIRS_DIR)
    if "shard" in cfg.prepare.phases:
        t0 = time.time()
        pending = sorted(set(range(len(plan))) - done_indices(pairs))
        log.info("shard phase: %d files -> %d shards, %d to build", len(files), len(plan), len(pending))
        results = run_shard_phase(cfg, plan, pending)
        phase = _aggregate(pairs, list(range(len(plan))))
        phase.update(built=len(results), skipped=len(plan) - len(pending),
                     elapsed_s=round(time.time() - t0, 3), stages=_stage_throughput(results))
        summary["phases"]["shard"] = phase
    if "annotate" in cfg.prepare.phases:
        summary["phases"]["annotate"] = run_annotate_phase(cfg, len(plan))
    final = summary["phases"].get("annotate") or summary["phases"].get("shard", {})
    summary.update(
        samples=final.get("samples", 0),
        rejected=final.get("rejected", 0),
        rejected_by_reason=final.get("rejected_by_reason", {}),
        elapsed_s=round(time.time() - start, 3),
    )
    summary["samples_per_s"] = round(summary["samples"] / summary["elapsed_s"], 2) if summary["elapsed_s"] else None
    out.write("summary.json", json.dumps(summary, indent=1, sort_keys=True).encode())
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser(
        "python -m pipeline.prepare",
        "HR images (local folder or s3://) -> degraded, annotated WebDataset shards under OUTPUT/shards.",
        ["data", "degradation", "prepare", "models", "annotate"],
    )
    _, cfg = parse_cli(parser, argv, sample_photos(), DEFAULT_OUTPUT)
    try:
        summary = run_prepare(cfg)
    except user_errors() as exc:
        print(error_line(exc), file=sys.stderr)
        return 1
    where = cfg.storage.open(cfg.output).url("")
    print(f"prepared {summary['samples']} samples ({summary['rejected']} rejected: "
          f"{summary['rejected_by_reason']}) in {summary['elapsed_s']} s")
    print(f"shards: {where}/{'shards' if 'annotate' in cfg.prepare.phases else PAIRS_DIR}  "
          f"summary: {where}/summary.json"
          + (f"; not images, by extension: {summary['skipped_by_extension']}" if summary["skipped_by_extension"] else ""))
    if not summary["samples"]:
        shard = summary["phases"].get("shard", {})
        print_rejects("samples", shard.get("rejects", []), summary["rejected_by_reason"])
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
