"""Peak memory and megapixels/s of tiled upscaling against image size.

Default: the untrained tiny-profile SpatialSemanticSRPipeline on CPU, one fresh process per size so
each process's peak RSS (``ru_maxrss``) belongs to that size alone; printed next to the RSS after
loading the model, so the image-dependent part is visible. ``--gpu``: the real-size architectures
(SD 1.5 UNet/VAE/text encoder, CLIP ViT-L/14, DINOv2-B, a Spatial-Semantic ControlNet from the UNet)
with random weights in bf16 on one GPU, ``--steps`` (20) full-schedule steps, 512 -> 2048 by default
plus the 4x-smaller image for the memory ratio (goal: under 10 s per image on one H100; a 4x larger
image within 1.3x the peak memory).
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


def cpu_one(args) -> dict:
    """One size in this process (called in a child): load, warm up on a small image, then measure."""
    from pipeline.upscale_model import resolve_model
    from spasem.config import load_config
    from spasem.model.sr_pipeline import load_sr_pipeline
    from spasem.model.tiled_diffusion import TiledUpscaler

    torch.set_num_threads(args.threads)
    pipe = load_sr_pipeline(resolve_model(load_config(None, [f"models.cache_dir={args.cache}"])))
    upscaler = TiledUpscaler(pipe, _upscale_config(args))
    upscaler(_image(16), seed=0)
    loaded = rss_mb()
    lr = _image(args.one)
    start = time.perf_counter()
    out = upscaler(lr, "a photo", "", seed=0)
    seconds = time.perf_counter() - start
    mp = out.shape[0] * out.shape[1] / 1e6
    return {"input": args.one, "output": out.shape[0], "seconds": round(seconds, 2), "megapixels_per_s": round(mp / seconds, 4),
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
    return (f"{r['input']:5d}^2 -> {r['output']:5d}^2  {r['seconds']:8.2f} s  {r['megapixels_per_s']:8.4f} MP/s  {mem}")


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
    upscaler(_image(args.sizes[0]), seed=0)  # warm-up: cuDNN algorithm choice, allocator pools
    rows = []
    for side in args.sizes:
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
    mode = "GPU real-size SD 1.5 bf16" if args.gpu else "CPU tiny profile"
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
