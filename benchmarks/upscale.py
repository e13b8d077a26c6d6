"""Seconds per image, CPU time and peak memory of upscaling against image size.

Default (CPU, tiny profile): what ``pipeline.upscale`` runs for one image, from the input PNG to
the written output: its reader, the caption and grounding stages it enables, the diffusion stage
and its writer (the same classes and functions as the Ray Data pipeline, in a loop without pools).
One fresh process per size, so each peak RSS (``ru_maxrss``) belongs to that size alone; warm-up at
every size, then the median of ``--repeats``, wall and process CPU time per step.

``--gpu``: MODEL ONLY, the tiled upscaler of the real-size architectures (SD 1.5 UNet/VAE/text
encoder, CLIP ViT-L/14, DINOv2-B, a Spatial-Semantic ControlNet from the UNet) with random weights
in bf16 on one GPU, ``--steps`` (20) full-schedule steps, 512 -> 2048 by default plus the 4x-smaller
image for the memory ratio: no decoding, captions or grounding (they need real LLaVA and Grounding
DINO weights; run ``pipeline.upscale`` with them for the end-to-end figure). Warm-up at every size.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def rss_mb() -> float:
    """Current resident set size of this process in MiB (Linux)."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _image(side: int, seed: int = 0) -> np.ndarray:
    """A photo-like input: a sample photo resized to ``side`` (texture matters little to the timing)."""
    import cv2
    import skimage.data

    return cv2.resize(skimage.data.astronaut(), (side, side), interpolation=cv2.INTER_AREA)


def _upscale_config(args, **extra):
    from spasem.config.upscale import UpscaleConfig

    return UpscaleConfig(scale=args.scale, steps=args.steps, realism=args.realism, tile_size=args.tile,
                         tile_overlap=args.overlap, tile_batch=args.tile_batch, color_fix=args.color_fix, **extra)


def _overrides(args) -> list[str]:
    return [f"upscale.scale={args.scale}", f"upscale.steps={args.steps}", f"upscale.realism={args.realism}",
            f"upscale.tile_size={args.tile}", f"upscale.tile_overlap={args.overlap}",
            f"upscale.tile_batch={args.tile_batch}", f"upscale.color_fix={args.color_fix}"]


def cpu_one(args) -> dict:
    """One size in this process (called in a child): what ``pipeline.upscale`` runs for one image, in a loop.

    The input PNG is read by the upscale reader, captioned and grounded by the annotation stages it
    enables, diffused by the diffusion stage and written by its writer: the same classes and
    functions as the Ray Data pipeline, without the pools. Warm-up at this size, then the median of
    ``--repeats`` per step, wall and process CPU time.
    """
    import statistics
    import tempfile

    import cv2

    from pipeline.annotate_phase import STAGES, stage_kwargs
    from pipeline.upscale import _read, _write, upscale_stages
    from pipeline.upscale_model import resolve_model
    from spasem.config import load_config
    from spasem.profiles import resolve_models
    from stages.diffuse import Diffuser

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "in").mkdir()
        cv2.imwrite(str(Path(tmp, "in", "photo.png")), cv2.cvtColor(_image(args.one), cv2.COLOR_RGB2BGR))
        cfg = load_config(None, [f"models.cache_dir={args.cache}", *_overrides(args)], input=f"{tmp}/in",
                          output=f"{tmp}/out")
        ucfg, inp, out = cfg.upscale, cfg.storage.open(cfg.input), cfg.storage.open(cfg.output)
        read = {"store": inp, "max_pixels": ucfg.max_input_pixels, "min_size": ucfg.min_input_size,
                "max_bytes": cfg.data.max_bytes}
        names = upscale_stages(cfg)
        paths = resolve_models(cfg.models)
        stages = {name: STAGES[name](**stage_kwargs(cfg, name, paths)) for name in names}
        stages["diffuse"] = Diffuser(upscale=ucfg, models=cfg.models, model=resolve_model(cfg))
        loaded = rss_mb()

        def once() -> dict[str, tuple[float, float]]:
            times = {}

            def timed(name, fn, batch):
                wall, cpu = time.perf_counter(), time.process_time()
                result = fn(batch)
                times[name] = (time.perf_counter() - wall, time.process_time() - cpu)
                return result

            batch = timed("read", lambda b: _read(b, **read), {"path": np.asarray(["photo.png"], dtype=object)})
            for name, stage in stages.items():
                batch = timed(name, stage, batch)
            batch = timed("write", lambda b: _write(b, out), batch)
            if batch["status"][0] != "ok":
                raise RuntimeError(f"size {args.one}: {batch['error'][0]}")
            return times

        once()  # warm-up at this size: allocator pools, lazy inits, the tile grid
        runs = [once() for _ in range(args.repeats)]
        steps = {name: [statistics.median(r[name][k] for r in runs) for k in (0, 1)] for name in runs[0]}
        output = args.one * args.scale
        total = [sum(v[k] for v in steps.values()) for k in (0, 1)]
        return {"input": args.one, "output": output, "seconds": round(total[0], 2), "cpu_seconds": round(total[1], 2),
                "megapixels_per_s": round(output**2 / 1e6 / total[0], 4),
                "steps": {k: [round(v[0], 3), round(v[1], 3)] for k, v in steps.items()},
                "rss_after_load_mb": round(loaded, 1), "peak_rss_mb": round(peak_rss_mb(), 1)}


def cpu(args) -> list[dict]:
    rows = []
    for side in args.sizes:
        cmd = [sys.executable, __file__, "--one", str(side)] + _forward(args)
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if result.returncode:
            print(result.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"size {side} failed")
        rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
        print(_row(rows[-1]), flush=True)
    return rows


def _forward(args) -> list[str]:
    return ["--scale", str(args.scale), "--steps", str(args.steps), "--realism", str(args.realism), "--tile",
            str(args.tile), "--overlap", str(args.overlap), "--tile-batch", str(args.tile_batch), "--color-fix",
            args.color_fix, "--cache", args.cache, "--threads", str(args.threads)]


def _row(r: dict) -> str:
    mem = f"peak RSS {r['peak_rss_mb']:8.1f} MiB (after load {r['rss_after_load_mb']:.1f})" if "peak_rss_mb" in r else \
        f"peak GPU {r['peak_gpu_mb']:8.1f} MiB (weights {r['weights_gpu_mb']:.1f})"
    line = (f"{r['input']:5d}^2 -> {r['output']:5d}^2  {r['seconds']:8.2f} s/image  {1 / r['seconds']:7.3f} images/s  "
            f"{r['megapixels_per_s']:8.4f} MP/s  {mem}")
    if "cpu_seconds" in r:
        line += f"\n{'':17s}CPU {r['cpu_seconds'] * 1000:9.0f} ms/image: " + ", ".join(
            f"{name} {wall:.2f} s ({cpu * 1000:.0f} CPU ms)" for name, (wall, cpu) in r["steps"].items())
    return line


def real_size_pipeline(dtype: torch.dtype, device: str):
    """SpatialSemanticSRPipeline of the real-size architectures, random weights, built on ``device``."""
    from transformers import BitImageProcessor, CLIPImageProcessor, CLIPTokenizer

    from spasem.config.model import ModelConfig
    from spasem.model.controlnet import SpatialSemanticControlNet
    from spasem.model.sr_pipeline import SpatialSemanticSRPipeline
    from spasem.profiles import ensure_tiny
    from spasem.profiles.real_size import build_from_config

    unet = build_from_config("sd15-unet", dtype, device)
    text_encoder = build_from_config("sd15-text_encoder", dtype, device)
    clip, dino = build_from_config("clip-vit-large-patch14", dtype, device), build_from_config("dinov2-base", dtype, device)
    controlnet = SpatialSemanticControlNet.from_unet(
        unet, text_dim=text_encoder.config.hidden_size, clip_dim=clip.config.hidden_size,
        dino_dim=dino.config.hidden_size, **ModelConfig().controlnet_kwargs(),
    ).to(device, dtype).eval()
    # token ids only index the embedding table: the tiny BPE tokenizer drives the real-size encoder
    tokenizer = CLIPTokenizer.from_pretrained(ensure_tiny(".cache/models", ("sd",))["sd"], subfolder="tokenizer")
    return SpatialSemanticSRPipeline(
        vae=build_from_config("sd15-vae", dtype, device), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        controlnet=controlnet, scheduler=build_from_config("sd15-scheduler"), clip_vision=clip,
        clip_processor=CLIPImageProcessor(), dino=dino,
        dino_processor=BitImageProcessor(image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]),
    )


def gpu(args) -> list[dict]:
    from spasem.model.tiled_diffusion import TiledUpscaler

    pipe = real_size_pipeline(torch.bfloat16, "cuda")
    weights = torch.cuda.memory_allocated() / 2**20
    upscaler = TiledUpscaler(pipe, _upscale_config(args), "cuda", torch.bfloat16)
    rows = []
    for side in args.sizes:
        upscaler(_image(side), "a photo", "", seed=0)  # warm-up at this size: cuDNN algorithms, allocator pools
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        out = upscaler(_image(side), "a photo", "", seed=0)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        mp = out.shape[0] * out.shape[1] / 1e6
        rows.append({"input": side, "output": out.shape[0], "seconds": round(seconds, 2),
                     "megapixels_per_s": round(mp / seconds, 4), "weights_gpu_mb": round(weights, 1),
                     "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1)})
        print(_row(rows[-1]), flush=True)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gpu", action="store_true", help="real-size SD 1.5 architecture, bf16, on one GPU")
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="input sides (default CPU 256..2048, GPU 256 512)")
    parser.add_argument("--scale", type=int, default=None, help="default: CPU 2, GPU 4")
    parser.add_argument("--steps", type=int, default=None, help="default: CPU 4, GPU 20")
    parser.add_argument("--realism", type=float, default=1.0, help="1 runs every step of the schedule")
    parser.add_argument("--tile", type=int, default=64, help="tile side in latent px")
    parser.add_argument("--overlap", type=int, default=16)
    parser.add_argument("--tile-batch", type=int, default=None, help="tiles per model call (default CPU 4, GPU 16)")
    parser.add_argument("--color-fix", default="wavelet")
    parser.add_argument("--cache", default=".cache/models")
    parser.add_argument("--threads", type=int, default=max(1, os.cpu_count() or 1))
    parser.add_argument("--repeats", type=int, default=1, help="CPU: timed runs per size after the warm-up (median)")
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args(argv)
    args.scale = args.scale or (4 if args.gpu else 2)
    args.steps = args.steps or (20 if args.gpu else 4)
    args.tile_batch = args.tile_batch or (16 if args.gpu else 4)
    args.sizes = args.sizes or ([256, 512] if args.gpu else [256, 512, 1024, 2048])
    if args.one is not None:
        print(json.dumps(cpu_one(args)))
        return
    mode = "GPU real-size SD 1.5 bf16, MODEL ONLY (tiled upscaler)" if args.gpu else \
        f"CPU tiny profile, end to end (read, captions, grounding, diffuse, write), {args.threads} threads"
    print(f"{mode}: x{args.scale}, {args.steps} steps, realism {args.realism}, tiles {args.tile}/{args.overlap} latent px, "
          f"{args.tile_batch} tiles per call, colour fix {args.color_fix}")
    rows = gpu(args) if args.gpu else cpu(args)
    for small, big in zip(rows, rows[1:], strict=False):
        key = "peak_gpu_mb" if args.gpu else "peak_rss_mb"
        pixels = (big["output"] / small["output"]) ** 2
        print(f"{pixels:.0f}x the pixels ({small['input']} -> {big['input']}): {big[key] / small[key]:.2f}x the peak memory")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
