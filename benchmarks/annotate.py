"""The annotate phase as a user runs it: a pairs shard in, the final shard out, timed per step.

One real pairs shard (prepare's own shard builder on scikit-image photos at ``data.hr_size``) goes
through exactly what a pool actor does with it: ``load_pairs`` decodes the PNGs, each enabled stage
class runs on the whole shard (its micro-batches, processors and models), and
``write_final_shard`` merges the annotations with the pairs members and writes the tar and marker.
Every step is timed in wall time and in process CPU time, and the CPU time spent inside model calls
(``forward``, ``generate``, ``encode`` of each stage's models) is counted apart, so the table shows
what decoding, preprocessing and shard writing cost around the models. Warm-up first, then the median
of ``--repeats``. The preprocessing runs twice: with transformers' image processors (``processors``,
the path before the torch transforms) and with the torch transforms of :mod:`spasem.preprocess`
(``torch``); ``--only-mode`` picks one. ``--breakdown`` also splits the CPU time outside the models by
part (PNG decoding, tar reading, torch transforms or processors, tokenizing, the VAE input's float
conversion, box selection, member encoding, tar building, marker and sha256, store writes; the rest of
each step is its Python), each part counted exclusive of the wrapped calls it makes.
The captions row counts every prompt a sample is asked (four by default: the two XPSR captions, the
quality caption of the HR for ``model.original_image_ratio``, and the objects list), with any backend;
``--set annotate.captions.low_hr=false`` leaves out the third.

``--ray`` also runs the phase through Ray Data actor pools (``pipeline.prepare`` with
``prepare.phases=[annotate]``) and prints its samples/s. On a GPU node: ``--set models.device=cuda
--set models.dtype=bfloat16 --config configs/sd15.yaml`` with real weights; ``--backend vllm``
captions through vLLM (the ``vllm`` extra, see docs/annotate.md). ``benchmarks/annotate_models.py``
keeps the model-only GPU figures.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import tempfile
import time
from collections import Counter, defaultdict
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

MODEL_METHODS = ("forward", "generate", "encode")


class CpuClock:
    """Process CPU seconds per part: model calls and the named steps around them, each exclusive of the
    wrapped calls it makes (a processor's tokenizer call counts as tokenizing, a nested forward once)."""

    def __init__(self):
        self.parts: Counter = Counter()
        self._open: list[list[float]] = []  # per open wrapped call: CPU seconds of the wrapped calls inside it

    @property
    def seconds(self) -> float:
        """CPU seconds inside model calls."""
        return self.parts["model"]

    def timed(self, fn, part: str):
        @functools.wraps(fn)  # generate validates its kwargs against forward's signature
        def timed(*args, **kwargs):
            start = time.process_time()
            self._open.append([0.0])
            try:
                return fn(*args, **kwargs)
            finally:
                elapsed = time.process_time() - start
                self.parts[part] += elapsed - self._open.pop()[0]
                if self._open:
                    self._open[-1][0] += elapsed

        timed.__wrapped_by_clock__ = True
        return timed

    def wrap(self, owner, name: str, part: str) -> None:
        fn = getattr(owner, name, None)
        if callable(fn) and not getattr(fn, "__wrapped_by_clock__", False):
            setattr(owner, name, self.timed(fn, part))

    def watch(self, stage) -> None:
        """Wrap the model methods of every torch module a stage holds (two attribute levels deep)."""
        seen: set[int] = set()
        for obj in [stage, *vars(stage).values()]:
            for value in [obj, *getattr(obj, "__dict__", {}).values()]:
                engine = type(value).__module__.startswith("vllm")  # the vLLM backend's engine is no torch module
                if (isinstance(value, torch.nn.Module) or engine) and id(value) not in seen:
                    seen.add(id(value))
                    for name in MODEL_METHODS:
                        self.wrap(value, name, "model")

    def watch_parts(self, stages) -> None:
        """Wrap what the phase does around the models, by part (``--breakdown``)."""
        import importlib

        for module, name, part in PARTS:
            owner = importlib.import_module(module)
            for attr in name.split(".")[:-1]:
                owner = getattr(owner, attr)
            fn = getattr(owner, name.split(".")[-1])
            # also where a module imported the function by name
            for mod in [owner, *list(sys.modules.values())]:
                for key, value in list(getattr(mod, "__dict__", {}).items()):
                    if value is fn and (mod is owner or key == fn.__name__):
                        self.wrap(mod, key, part)
        for stage in stages:  # the transformers processors and tokenizers the stages hold
            for obj in _holders(stage):
                for attr in ("processor", "image_processor", "clip_processor", "dino_processor", "tokenizer"):
                    proc = getattr(obj, attr, None)
                    if proc is None:
                        continue
                    # a part per class: LLaVA's image processor is CLIP's class, so they share a row
                    self.wrap(type(proc), "__call__", "tokenize" if attr == "tokenizer" else
                              f"processor ({type(proc).__name__})")
                    self.wrap(type(proc), "apply_chat_template", "chat template")
                    for sub in ("tokenizer", "image_processor"):
                        inner = getattr(proc, sub, None)
                        if inner is not None:
                            self.wrap(type(inner), "__call__", "tokenize" if sub == "tokenizer" else
                                      f"processor ({type(inner).__name__})")
                    for method in ("batch_decode", "decode"):
                        self.wrap(type(getattr(proc, "tokenizer", proc)), method, "detokenize")


def _holders(stage) -> list:
    return [stage, *(v for v in vars(stage).values() if hasattr(v, "__dict__"))]


# (module, function or Class.method, part) the --breakdown table times apart; the rest of a step is
# its Python: loops over rows, column building, small tensor ops
PARTS = (
    ("spasem.shards", "read_tar", "tar read"),
    ("spasem.shards", "decode_member", "member decode (png, json)"),
    ("spasem.preprocess", "ImageTransform.__call__", "torch transforms"),
    ("spasem.encoders", "images_to_tensor", "uint8 -> [-1, 1] float"),
    ("stages.embeddings", "_fp16", "device -> fp16 numpy"),
    ("spasem.vlm.phrases", "parse_objects", "objects parsing"),
    ("stages.grounding", "select_boxes", "box selection, NMS"),
    ("spasem.shards", "encode_json", "member encode: json"),
    ("spasem.shards", "encode_npy", "member encode: npy"),
    ("spasem.shards", "build_tar", "tar build"),
    ("spasem.shards", "ShardWriter.close", "marker, sha256"),
    ("spasem.storage", "LocalStore.write", "store write"),
)


def set_processors(stage, on: bool) -> None:
    """Switch a stage between transformers' processors and the torch transforms, where it has both."""
    for obj in (stage, getattr(stage, "encoders", None), getattr(stage, "backend", None)):
        if obj is not None and hasattr(obj, "use_processors"):
            obj.use_processors = on


@contextmanager
def step(times: dict[str, list[tuple]], name: str, clock: CpuClock):
    """Append (wall s, CPU s, model CPU s, CPU s per part) of the block to ``times[name]``."""
    wall, cpu, parts = time.perf_counter(), time.process_time(), Counter(clock.parts)
    yield
    delta = Counter(clock.parts)
    delta.subtract(parts)
    times[name].append((time.perf_counter() - wall, time.process_time() - cpu, delta["model"], delta))


def make_pairs(cfg) -> int:
    """Prepare's shard builder writes ``OUT/pairs/shard-000000`` from the input photos; returns its sample count."""
    from PIL import Image

    from pipeline.prepare import list_inputs
    from pipeline.shard_phase import ShardBuilder

    size = cfg.data.hr_size
    # photos at least one crop wide (headers only); a smaller one would be a reject, not a sample
    def big_enough(name: str) -> bool:
        try:
            with Image.open(os.path.join(cfg.input, name)) as im:
                return min(im.size) >= size
        except OSError:  # not an image PIL opens: the reader would reject it too
            return False

    return ShardBuilder(cfg).build(0, [f for f in list_inputs(cfg)[0] if big_enough(f)])["count"]


def run_once(cfg, names, stages, ids, times, clock: CpuClock, repeat: int) -> None:
    """One pass of the phase over shard 0, as an actor and the writer task run it, timed per step."""
    from pipeline.annotate_phase import PIXELS, load_pairs, write_final_shard
    from spasem.shards import FINAL_DIR, PAIRS_DIR, load_marker

    out = cfg.storage.open(cfg.output)
    pairs, final = out.child(PAIRS_DIR), out.child(f"{FINAL_DIR}-bench-{repeat}")
    with step(times, "decode (load_pairs)", clock):
        batch = load_pairs({"shard": np.asarray([0])}, pairs)
    for name in names:
        with step(times, name, clock):
            batch = stages[name](batch)
    with step(times, "write final shard", clock):
        rows = [{k: v[i] for k, v in batch.items() if k not in PIXELS} for i in range(len(batch["key"]))]
        write_final_shard(pairs, final, 0, load_marker(pairs, 0), rows, ids)


def summarize(times, n: int) -> dict[str, tuple[float, float, float]]:
    """Per step: median wall ms, CPU ms and model CPU ms per sample; plus the whole phase."""
    rows = {name: tuple(statistics.median(t[k] for t in samples) * 1000 / n for k in range(3))
            for name, samples in times.items()}
    rows["whole phase"] = tuple(sum(r[k] for r in rows.values()) for k in range(3))
    return rows


def breakdown(times, n: int) -> dict[str, dict[str, float]]:
    """Per step: median CPU ms per sample of each part outside the models; the rest is the step's Python."""
    out = {}
    for name, samples in times.items():
        parts = {p for t in samples for p in t[3] if p != "model"}
        ms = {p: statistics.median(t[3][p] for t in samples) * 1000 / n for p in sorted(parts)}
        other = statistics.median(t[1] - t[2] for t in samples) * 1000 / n
        out[name] = {**{p: v for p, v in ms.items() if v >= 0.005}, "rest (Python, small ops)": other - sum(ms.values())}
    return out


def print_breakdown(title: str, parts: dict[str, dict[str, float]]) -> None:
    print(f"{title}: CPU ms per sample outside model calls, by part")
    total: Counter = Counter()
    for name, figures in parts.items():
        print(f"  {name}")
        for part, ms in figures.items():
            print(f"    {part:34s} {ms:7.2f}")
            total[part] += ms
    print("  whole phase")
    for part, ms in total.most_common():
        print(f"    {part:34s} {ms:7.2f}")


def print_prompts(cfg, wall_ms: float) -> None:
    """What the captions row counts: every prompt a sample is asked (three by default), whatever the backend."""
    from stages.captions import caption_asks

    asks = caption_asks(cfg.annotate.captions, has_hr=True)
    count = sum(len(pairs) for pairs in asks.values())
    which = "; ".join(f"{column}: {', '.join(name for name, _ in pairs)}" for column, pairs in asks.items())
    print(f"  captions ({cfg.annotate.captions.backend}): {count} prompts per sample ({which}) = "
          f"{count * 1000 / wall_ms:.1f} answers/s, {1000 / wall_ms:.1f} samples/s")


def print_table(title: str, rows) -> None:
    print(f"{title}\n  {'step':22s} {'images/s':>9s} {'wall ms':>9s} {'CPU ms':>9s} {'model CPU':>10s} {'other CPU':>10s}"
          "   (per sample)")
    for name, (wall, cpu, model) in rows.items():
        print(f"  {name:22s} {1000 / wall if wall else float('inf'):9.1f} {wall:9.2f} {cpu:9.2f} {model:10.2f} "
              f"{cpu - model:10.2f}")


def real_size_preprocessing(hr: np.ndarray, lr: np.ndarray, repeats: int) -> None:
    """CPU ms per sample of the preprocessing the stages do, at the real checkpoints' processor settings.

    The tiny profile's processors work at 32-64 px, so its table understates what they cost with real
    weights: LLaVA-1.5 at 336 px (LR), Grounding DINO at 800 px (LR), CLIP at 224 and DINOv2 at 256/224
    (LR and HR each). Same decoded crops, processors against the torch transforms, median of repeats.
    """
    from transformers import BitImageProcessor, CLIPImageProcessor, GroundingDinoImageProcessor

    from spasem.preprocess import ImageTransform

    imagenet = {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}
    work = [  # (what, processor, images): one entry per processor call a stage makes on a shard
        ("llava 336 (LR)", CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}),
         [lr]),
        ("grounding dino 800 (LR)", GroundingDinoImageProcessor(), [lr]),
        ("clip 224 (LR + HR)", CLIPImageProcessor(), [lr, hr]),
        ("dinov2 256/224 (LR + HR)", BitImageProcessor(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224},
                                                       do_center_crop=True, **imagenet), [lr, hr]),
    ]
    n = len(hr)
    print(f"preprocessing at the real checkpoints' processor settings, CPU ms per sample (median of {repeats}):")
    totals = [0.0, 0.0]
    for what, proc, groups in work:
        transform = ImageTransform.from_processor(proc)
        paths = (lambda proc=proc, groups=groups: [proc(images=list(g), return_tensors="pt") for g in groups],
                 lambda transform=transform, groups=groups: [transform(g) for g in groups])
        figures = []
        for fn in paths:
            fn()
            runs = []
            for _ in range(repeats):
                start = time.process_time()
                fn()
                runs.append((time.process_time() - start) * 1000 / n)
            figures.append(statistics.median(runs))
        totals = [t + f for t, f in zip(totals, figures, strict=True)]
        print(f"  {what:26s} processors {figures[0]:7.2f}   torch {figures[1]:6.2f}")
    print(f"  {'all four':26s} processors {totals[0]:7.2f}   torch {totals[1]:6.2f}")


def run_ray(cfg_args: list[str], out: str) -> None:
    """The phase through Ray Data actor pools, as ``python -m pipeline.prepare`` runs it."""
    import json

    from pipeline.prepare import main as prepare_main

    out_store = Path(out)
    for marker in (out_store / "shards").glob("*.json"):
        marker.unlink()
    prepare_main(["--output", out, "--set", "prepare.phases=[annotate]", "--set", "prepare.progress=false",
                  *cfg_args])
    summary = json.loads((out_store / "summary.json").read_text())["phases"]["annotate"]
    print(f"through Ray Data actor pools (start-up of {len(summary['stages'])} pools included): "
          f"{summary['samples']} samples in {summary['elapsed_s']:.1f} s = {summary['samples_per_s']} samples/s")
    for name, figures in summary["stage_throughput"].items():
        print(f"  {name:12s} actor time {figures['actor_seconds']:.2f} s = {figures['samples_per_s']} samples/s")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=None, help="a config file (e.g. real weights: configs/sd15.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="dotted.key=value")
    parser.add_argument("--gpu", action="store_true", help="models.device=cuda, models.dtype=bfloat16")
    parser.add_argument("--backend", default=None, help="annotate.captions.backend (transformers | vllm | ...)")
    parser.add_argument("--crops", type=int, default=2, help="data.crops_per_image (samples = photos x crops)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: CPU time equals work done)")
    parser.add_argument("--only-mode", choices=("processors", "torch"), default=None)
    parser.add_argument("--ray", action="store_true", help="also run the phase through Ray Data actor pools")
    parser.add_argument("--cache", default=".cache/models", help="tiny model cache")
    parser.add_argument("--breakdown", action="store_true",
                        help="also time the parts outside the models (decode, transforms, tokenizing, members, tar)")
    args = parser.parse_args(argv)

    from pipeline.annotate_phase import STAGES, check_stages, prepare_stages, stage_ids, stage_kwargs
    from spasem.config import load_config, sample_photos
    from spasem.profiles import resolve_models

    torch.set_num_threads(args.threads)
    # the bundled photos at least data.hr_size on the short side (the shard builder rejects the others)
    overrides = ["data.hr_size=512", f"data.crops_per_image={args.crops}", "data.shard_size=4096", f"models.cache_dir={args.cache}", "annotate.captions.max_new_tokens=16"]
    if args.gpu:
        overrides += ["models.device=cuda", "models.dtype=bfloat16"]
    if args.backend:
        overrides.append(f"annotate.captions.backend={args.backend}")
    overrides += args.overrides
    with tempfile.TemporaryDirectory(prefix="bench-annotate-") as tmp:
        out = str(Path(tmp) / "out")
        cfg = load_config(args.config, overrides, input=sample_photos(), output=out)
        n = make_pairs(cfg)
        names = check_stages(prepare_stages(cfg))
        paths = resolve_models(cfg.models)
        ids = stage_ids(cfg, names)
        stages = {name: STAGES[name](**stage_kwargs(cfg, name, paths)) for name in names}
        clock = CpuClock()
        for stage in stages.values():
            clock.watch(stage)
        if args.breakdown:
            clock.watch_parts(stages.values())
        device = cfg.models.device
        print(f"annotate phase, one shard of {n} samples ({cfg.data.hr_size} px HR, {cfg.data.lr_size} px LR), "
              f"profile {cfg.models.profile}, {device}, {args.threads} torch thread(s), machine: {os.cpu_count()} "
              f"cores; median of {args.repeats} after a warm-up")
        results = {}
        for mode in ("processors", "torch") if args.only_mode is None else (args.only_mode,):
            for stage in stages.values():
                set_processors(stage, mode == "processors")
            times = defaultdict(list)
            for r in range(args.repeats + 1):
                if r == 1:
                    times.clear()  # the first pass warmed up every step at this size
                run_once(cfg, names, stages, ids, times, clock, r)
            results[mode] = summarize(times, n)
            print_table(f"preprocessing: {mode}", results[mode])
            if "captions" in results[mode]:
                print_prompts(cfg, results[mode]["captions"][0])
            if args.breakdown:
                print_breakdown(f"preprocessing: {mode}", breakdown(times, n))
        if len(results) == 2:
            before, after = (results[m]["whole phase"] for m in ("processors", "torch"))
            print(f"CPU ms per sample outside model calls, whole phase: processors {before[1] - before[2]:.2f}, "
                  f"torch {after[1] - after[2]:.2f} ({(after[1] - after[2]) / (before[1] - before[2]):.2f}x)")
        if not args.gpu:
            from pipeline.annotate_phase import load_pairs
            from spasem.shards import PAIRS_DIR

            pixels = load_pairs({"shard": np.asarray([0])}, cfg.storage.open(cfg.output).child(PAIRS_DIR))
            real_size_preprocessing(pixels["hr"], pixels["lr"], args.repeats)
        if args.ray:
            cfg_args = (["--config", args.config] if args.config else []) + [
                a for o in overrides if not o.startswith("models.cache_dir") for a in ("--set", o)]
            run_ray(["--input", sample_photos(), *cfg_args, "--set", f"models.cache_dir={os.path.abspath(args.cache)}"], out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
