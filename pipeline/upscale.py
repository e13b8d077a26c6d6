"""``python -m pipeline.upscale``: upscale a bucket of images of any size with tiled latent diffusion.

Listing (local folder or ``s3://``) -> skip inputs whose output exists -> Ray Data: read (rejects with
reasons) -> the caption and grounding stages of prepare, each on its own actor pool -> the diffusion
stage on an actor pool (``upscale.diffuse``) -> write (same relative path and format) -> only the
small columns come back, for ``OUTPUT/summary.json`` (counts, rejects, megapixels/s).
Re-running after a crash finishes the rest: outputs are written atomically and existing ones skipped.

Each image is its own block, so it is written as soon as it is done; Ray Data's no-progress timeout
is off for this dataset (one large image may take hours on a CPU), and the diffusion stage logs each
image's progress and time left instead. Exit status 1 when nothing was upscaled though inputs were
pending (every one rejected), on a user error (bad path, model folder, URI, storage permission), and
when an image runs out of memory even one tile per model call.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

from pipeline.annotate_phase import annotate_dataset, check_stages
from spasem.config import (
    Config,
    ConfigError,
    absolute_uri,
    build_parser,
    config_to_yaml,
    parse_cli,
    sample_photos,
)
from spasem.profiles import TINY_VERSION, announce_tiny, fixed_cache
from spasem.storage import Store
from stages.diffuse import DiffuseOutOfMemory
from stages.read import list_images, reject_reason
from stages.runtime import error_line, find_cause, init_ray, print_rejects, user_errors

log = logging.getLogger("pipeline.upscale")
DEFAULT_OUTPUT = "runs/upscale"
SUMMARY = "summary.json"


def _nested_prefix(inp: Store, out: Store) -> str | None:
    """The output's path relative to the input when the output lies inside it (its files are no inputs)."""
    a, b = inp.uri.rstrip("/") + "/", out.uri.rstrip("/") + "/"
    return b[len(a):] if b.startswith(a) else None


def list_pending(cfg: Config, inp: Store, out: Store) -> tuple[list[str], list[str], dict[str, int]]:
    """(inputs to upscale, inputs skipped because their output exists, {extension: other files})."""
    suffixes = cfg.data.suffixes
    nested = _nested_prefix(inp, out)
    if nested == "":
        raise ConfigError(f"--output {out.uri} is the input folder: the outputs would replace the originals; "
                          "choose another folder (one inside the input is fine)")
    files, others = list_images(inp, suffixes, exclude=nested or None)
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(suffixes)}) found under {cfg.input}"
                                + (f"; other files by extension: {others}" if others else ""))
    done = set(out.list(suffixes)) if cfg.upscale.skip_existing else set()
    return [f for f in files if f not in done], [f for f in files if f in done], others


def upscale_stages(cfg: Config) -> list[str]:
    """Annotation stages to run: ``upscale.stages`` if given, else those enabled in ``annotate``."""
    if cfg.upscale.stages is not None:
        return check_stages(list(cfg.upscale.stages))
    # embeddings only feed visual_tokens=image; with "tile" the diffusion stage encodes each tile's own crop
    wanted = ("captions", "grounding") + (("embeddings",) if cfg.upscale.visual_tokens == "image" else ())
    return check_stages([s for s in wanted if getattr(cfg.annotate, s).enabled])


def _read(batch: dict, **kwargs: Any) -> dict:
    from stages.upscale_io import ReadLR

    return ReadLR(**kwargs)(batch)


def _write(batch: dict, store: Store) -> dict:
    from stages.upscale_io import WriteOutputs

    return WriteOutputs(store)(batch)


def run_pipeline(cfg: Config, pending: list[str], inp: Store, out: Store, model: str | None,
                 names: list[str]) -> list[dict[str, Any]]:
    """Upscale ``pending`` on Ray Data; returns one small row per input (path, status, error, sizes, times)."""
    import ray

    from stages.diffuse import Diffuser

    ucfg = cfg.upscale
    # one image per block: each output is written when its image is done, not when its block is
    ds = ray.data.from_items([{"path": p} for p in pending], override_num_blocks=len(pending))
    read = {"store": inp, "max_pixels": ucfg.max_input_pixels, "min_size": ucfg.min_input_size,
            "max_bytes": cfg.data.max_bytes}
    ds = ds.map_batches(_read, fn_kwargs=read, batch_size=1, num_cpus=ucfg.read_num_cpus, batch_format="numpy")
    if names:
        from spasem.profiles import NodePaths

        ds = annotate_dataset(ds, cfg, names, NodePaths(cfg.models), whole_blocks=False)
    pool = ucfg.diffuse
    ds = ds.map_batches(
        Diffuser, batch_size=pool.batch_size,
        # the URI, not a local folder: each actor resolves the model on its own node
        fn_constructor_kwargs={"upscale": cfg.upscale, "models": fixed_cache(cfg.models), "model": model,
                               "model_cfg": cfg.model, "storage": cfg.storage},
        batch_format="numpy", num_cpus=pool.num_cpus, num_gpus=pool.num_gpus or None,
        compute=ray.data.ActorPoolStrategy(size=pool.pool_size),
    )
    ds = ds.map_batches(_write, fn_kwargs={"store": out}, batch_size=1, batch_format="numpy",
                        num_cpus=ucfg.read_num_cpus)
    # no-progress guard off: one image may legitimately take hours (a 16k output, a CPU); the
    # diffusion stage reports each image's progress and time left instead (stages/progress.py)
    ds.context.execution_no_progress_timeout_s = -1
    log.info("upscaling %d images: stages %s -> diffuse (pool %d) -> write", len(pending), names, pool.pool_size)
    return [dict(row) for row in ds.iter_rows()]


def summarize(cfg: Config, rows: list[dict[str, Any]], skipped: list[str], elapsed: float, model: str,
              stages: list[str], others: dict[str, int] | None = None) -> dict[str, Any]:
    """Counts, rejects by reason and throughput (output megapixels per second) of one run."""
    ok = [r for r in rows if r["status"] == "ok"]
    rejects = [{"source": str(r["path"]), "reason": reject_reason(str(r["error"])), "error": str(r["error"])}
               for r in rows if r["status"] != "ok"]
    out_mp = sum(int(r["out_pixels"]) for r in ok) / 1e6
    in_mp = sum(int(r["in_pixels"]) for r in ok) / 1e6
    diffuse_s = sum(float(r["diffuse_s"]) for r in ok)
    return {
        "input": cfg.input, "output": cfg.output, "model": model, "stages": stages + ["diffuse"],
        "files": len(rows) + len(skipped), "upscaled": len(ok), "skipped": len(skipped),
        "rejected": len(rejects), "rejected_by_reason": dict(sorted(Counter(r["reason"] for r in rejects).items())),
        "rejects": sorted(rejects, key=lambda r: r["source"]),
        "skipped_by_extension": dict(others or {}),
        "input_megapixels": round(in_mp, 4), "output_megapixels": round(out_mp, 4),
        "elapsed_s": round(elapsed, 3),
        "megapixels_per_s": round(out_mp / elapsed, 4) if elapsed > 0 and ok else None,
        "diffuse_megapixels_per_actor_s": round(out_mp / diffuse_s, 4) if diffuse_s > 0 else None,
        "scale": cfg.upscale.scale, "realism": cfg.upscale.realism, "steps": cfg.upscale.steps,
    }


def run_upscale(cfg: Config) -> dict[str, Any]:
    """Upscale every pending input of ``cfg.input`` into ``cfg.output``; writes config.yaml and summary.json."""
    from pipeline.upscale_model import model_uri

    announce_tiny(cfg.models, cfg.input, "pipeline.upscale")
    start = time.time()
    inp = cfg.storage.open(cfg.input)
    out = cfg.storage.open(cfg.output)
    stages = upscale_stages(cfg)
    pending, skipped, others = list_pending(cfg, inp, out)
    out.write("config.yaml", config_to_yaml(cfg).encode())
    log.info("%d inputs: %d to upscale, %d skipped (output exists)", len(pending) + len(skipped), len(pending), len(skipped))
    rows: list[dict[str, Any]] = []
    model = None
    if pending:
        model = model_uri(cfg)
        init_ray(cfg.ray, progress=True)
        rows = run_pipeline(cfg, pending, inp, out, model, stages)
    model_name = cfg.upscale.model or f"tiny-v{TINY_VERSION}/sr-untrained"
    summary = summarize(cfg, rows, skipped, time.time() - start, model_name, stages, others)
    out.write(SUMMARY, json.dumps(summary, indent=1, sort_keys=True).encode())
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser(
        "python -m pipeline.upscale",
        "Upscale every image under --input (local folder or s3://) into --output, same relative paths and formats.",
        ["upscale", "models"],
    )
    parser.add_argument("--model", default=None,
                        help="SpatialSemanticSRPipeline folder, local or s3:// (a training run's RUN_URI/export); "
                             "default: the untrained tiny-profile build")
    args, cfg = parse_cli(parser, argv, sample_photos(), DEFAULT_OUTPUT)
    if args.model:
        cfg.upscale.model = absolute_uri(args.model)
    try:
        summary = run_upscale(cfg)
    except user_errors() as exc:
        print(error_line(exc), file=sys.stderr)
        return 1
    except Exception as exc:
        oom = find_cause(exc, DiffuseOutOfMemory)  # raised in an actor: Ray wraps it
        if oom is None:
            raise
        print(error_line(oom), file=sys.stderr)
        return 1
    where = cfg.storage.open(cfg.output).url("")
    print(f"upscaled {summary['upscaled']} images, skipped {summary['skipped']} (output exists), "
          f"rejected {summary['rejected']} {summary['rejected_by_reason']}; "
          f"{summary['output_megapixels']} MP out at {summary['megapixels_per_s']} MP/s"
          + (f"; not images, by extension: {summary['skipped_by_extension']}" if summary["skipped_by_extension"] else ""))
    print(f"outputs: {where}  summary: {where}/{SUMMARY}")
    if summary["rejected"] and not summary["upscaled"]:
        print_rejects("images", summary["rejects"], summary["rejected_by_reason"])
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
