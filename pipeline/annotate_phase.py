"""Prepare's annotate phase: ``OUT/pairs`` shards -> annotation actor pools -> final ``OUT/shards``.

One Ray Data execution per wave of ``annotate.shards_per_wave`` shards: each shard is read as one
block, its rows stream through one actor pool per enabled stage (each sized on its own: captioning is
the bottleneck), and only the small annotation columns come back to the driver. As soon as all rows
of a shard are back (the pairs marker gives the count), a task merges them with the pixels it re-reads
from the pairs shard and writes the final shard and its marker. A killed run resumes at the shards
without a marker; stages micro-batch within a shard, so a resumed shard gets the same bytes.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, defaultdict
from typing import Any

import numpy as np

from spasem.columns import object_array
from spasem.config import Config, ConfigError
from spasem.shards import (
    FINAL_DIR,
    PAIRS_DIR,
    ShardWriter,
    decode_member,
    done_indices,
    encode_annotations,
    load_marker,
    read_tar,
    shard_name,
)
from spasem.storage import Store
from stages import captions, embeddings, encode, grounding

log = logging.getLogger(__name__)
STAGE_ORDER = ("captions", "grounding", "embeddings", "encode")
PIXELS = ("hr", "lr")


def prepare_stages(cfg: Config) -> list[str]:
    """The annotation stages prepare runs: those enabled in ``annotate``, in pipeline order."""
    return [name for name in STAGE_ORDER if getattr(cfg.annotate, name).enabled]


def check_stages(names: list[str]) -> list[str]:
    """``names`` in pipeline order, refusing grounding without the captions that name its objects."""
    names = [name for name in STAGE_ORDER if name in names]
    if "grounding" in names and "captions" not in names:
        raise ConfigError("the grounding stage needs the objects named by the captions stage: enable captions "
                          "(annotate.captions.enabled, or upscale.stages) or turn grounding off")
    return names


def load_pairs(batch: dict[str, np.ndarray], store: Store) -> dict[str, np.ndarray]:
    """Rows of the pairs shards named in ``batch["shard"]``: key, shard, source, hr, lr, status, error."""
    cols: dict[str, list] = defaultdict(list)
    for index in batch["shard"]:
        for key, members in read_tar(store.read(shard_name(int(index)))):
            cols["key"].append(key)
            cols["shard"].append(int(index))
            cols["source"].append(decode_member("json", members["json"])["source"])
            cols["hr"].append(decode_member("hr.png", members["hr.png"]))
            cols["lr"].append(decode_member("lr.png", members["lr.png"]))
    n = len(cols["key"])
    return {
        "key": object_array(cols["key"]),
        "shard": np.asarray(cols["shard"], np.int64),
        "source": object_array(cols["source"]),
        "hr": np.stack(cols["hr"]) if n else np.zeros((0, 1, 1, 3), np.uint8),
        "lr": np.stack(cols["lr"]) if n else np.zeros((0, 1, 1, 3), np.uint8),
        "status": object_array(["ok"] * n),
        "error": object_array([""] * n),
    }


def write_final_shard(
    pairs: Store, final: Store, index: int, pair_marker: dict[str, Any], rows: list[dict[str, Any]],
    stages: dict[str, str],
) -> dict[str, Any]:
    """Merge one shard's annotation rows with its pairs members and write the final shard + marker."""

    by_key = {r["key"]: r for r in rows}
    writer = ShardWriter(final, index)
    for rej in pair_marker["rejected"]:
        writer.reject(rej["source"], rej["reason"])
    for key, members in read_tar(pairs.read(shard_name(index))):
        row = by_key.get(key)
        if row is None:
            raise RuntimeError(f"shard {index}: no annotation row came back for key {key!r}")
        if row["status"] != "ok":
            writer.reject(f"{row['source']}#{key}", str(row["error"]))
            continue
        writer.write({"__key__": key, **members, **encode_annotations(row, stages)})
    return writer.close({**pair_marker["stages"], **stages})


# stage name -> the class the pool runs; tests swap in wrappers here (e.g. one that fails on a key)
STAGES: dict[str, type] = {
    "captions": captions.Captioner,
    "grounding": grounding.Grounder,
    "embeddings": embeddings.Embedder,
    "encode": encode.Encoder,
}


def stage_kwargs(cfg: Config, name: str, paths: dict[str, str]) -> dict[str, Any]:
    """Constructor arguments of stage ``name``: its own config section, the models section, model paths."""
    kwargs: dict[str, Any] = {"section": getattr(cfg.annotate, name), "models": cfg.models, "paths": paths}
    if name == "grounding":
        kwargs["max_boxes"] = cfg.model.max_boxes
    return kwargs


def stage_ids(cfg: Config, names: list[str]) -> dict[str, str]:
    """Stage name -> the model id recorded in markers and members (never a local cache path), and the
    profile, so a marker says outright when the toy models made it."""
    from spasem.profiles import stage_model_ids

    return {**stage_model_ids(cfg.models, names), "profile": cfg.models.profile}


def annotate_dataset(ds, cfg: Config, names: list[str], paths: dict[str, str], whole_blocks: bool = True):
    """Chain the stages ``names`` on ``ds``, one actor pool each, sized by ``annotate.<stage>``.

    ``whole_blocks``: prepare hands each stage one shard per call (the stage micro-batches within it,
    so a resumed shard gets the same bytes); upscale streams ``annotate.<stage>.batch_size`` rows.
    """
    import ray

    for name in names:
        pool = getattr(cfg.annotate, name)
        ds = ds.map_batches(
            STAGES[name],
            fn_constructor_kwargs=stage_kwargs(cfg, name, paths),
            batch_size=None if whole_blocks else pool.batch_size,
            batch_format="numpy",
            num_cpus=pool.num_cpus,
            num_gpus=pool.num_gpus or None,
            compute=ray.data.ActorPoolStrategy(size=pool.pool_size),
            **pool_options(cfg, name),
        )
    return ds


def pool_options(cfg: Config, name: str) -> dict[str, Any]:
    """Extra Ray options of a stage's pool: the vLLM caption backend runs in an environment of its own
    (vLLM pins its own torch), which Ray builds per actor from ``vllm_backend.RUNTIME_ENV``."""
    if name == "captions" and cfg.annotate.captions.backend == "vllm":
        from spasem.vlm.vllm_backend import RUNTIME_ENV

        return {"runtime_env": RUNTIME_ENV}
    return {}


def run_annotate_phase(cfg: Config, num_shards: int) -> dict[str, Any]:
    """Annotate every pairs shard that has no final marker yet; returns the phase summary."""
    import ray

    from pipeline.captions_prepass import attach_captions, caption_wave, uses_llm_processor
    from spasem.profiles import NodePaths

    start = time.time()
    out = cfg.storage.open(cfg.output)
    pairs, final = out.child(PAIRS_DIR), out.child(FINAL_DIR)
    ready = done_indices(pairs)
    missing = sorted(set(range(num_shards)) - ready)
    if missing:
        raise FileNotFoundError(
            f"annotate needs the pairs shards first: {len(missing)} missing under {pairs.uri} "
            f"(e.g. shard {missing[0]}); run with prepare.phases=[shard, annotate]"
        )
    names = check_stages(prepare_stages(cfg))
    pending = sorted(set(range(num_shards)) - done_indices(final))
    paths = NodePaths(cfg.models)  # resolved by each actor on its own node
    ids = stage_ids(cfg, names)
    log.info("annotate phase: %d shards, %d to do, stages %s", num_shards, len(pending), names)
    writer = ray.remote(num_cpus=0.25)(write_final_shard)
    seconds: Counter = Counter()
    annotated = 0
    wave_size = cfg.annotate.shards_per_wave
    for w in range(0, len(pending), wave_size):
        wave = pending[w : w + wave_size]
        pair_markers = {i: load_marker(pairs, i) for i in wave}
        expected = {i: marker["count"] for i, marker in pair_markers.items()}
        grouped: dict[int, list[dict[str, Any]]] = defaultdict(list)
        writes = [writer.remote(pairs, final, i, pair_markers[i], [], ids) for i in wave if expected[i] == 0]
        todo = [i for i in wave if expected[i] > 0]
        if todo:
            ds = ray.data.from_items([{"shard": i} for i in todo], override_num_blocks=len(todo))
            ds = ds.map_batches(load_pairs, fn_kwargs={"store": pairs}, batch_size=1, num_cpus=0.25)
            chain = names
            if uses_llm_processor(cfg, names):  # captions by ray.data.llm first, then the rest per shard
                answers, per_sample = caption_wave(cfg, pairs, todo)
                ds = ds.map_batches(attach_captions, batch_size=None, batch_format="numpy", num_cpus=0.25,
                                    fn_kwargs={"section": cfg.annotate.captions, "answers": answers,
                                               "seconds_per_sample": per_sample})
                chain = [name for name in names if name != "captions"]
            ds = annotate_dataset(ds, cfg, chain, paths).drop_columns(list(PIXELS))
            for row in ds.iter_rows():
                index = int(row["shard"])
                grouped[index].append(row)
                seconds.update({k[len("seconds_"):]: float(v) for k, v in row.items() if k.startswith("seconds_")})
                annotated += 1
                if len(grouped[index]) == expected[index]:  # shard complete: write it while the rest runs
                    writes.append(writer.remote(pairs, final, index, pair_markers[index], grouped.pop(index), ids))
        ray.get(writes)
        if grouped:
            raise RuntimeError(f"annotate: rows missing for shards {sorted(grouped)} (expected {expected})")
    markers = [load_marker(final, i) for i in range(num_shards)]
    # shard-phase reasons are short constants; annotation errors read "<stage>: <message>"
    reasons = Counter(r["reason"].split(": ", 1)[0] for m in markers for r in m["rejected"])
    done_samples = sum(markers[i]["count"] for i in pending)
    elapsed = time.time() - start
    return {
        "shards": num_shards,
        "built": len(pending),
        "skipped": num_shards - len(pending),
        "samples": sum(m["count"] for m in markers),
        "rejected": sum(reasons.values()),
        "rejected_by_reason": dict(sorted(reasons.items())),
        "stages": ids,
        "stage_throughput": {
            name: {"actor_seconds": round(seconds[name], 3),
                   "samples_per_s": round(annotated / seconds[name], 2) if seconds[name] > 0 else None}
            for name in names
        },
        "elapsed_s": round(elapsed, 3),
        "samples_per_s": round(done_samples / elapsed, 2) if pending and elapsed > 0 else None,
    }
