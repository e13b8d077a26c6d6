"""Images/s of each annotation stage.

Default: the real stage classes with the tiny profile on CPU (what ``make bench`` runs anywhere).
``--gpu``: the real-size architectures of ``configs/models`` with random weights in bf16 on one GPU,
driven the way the stages drive them: LLaVA-1.5-7B with both prompts in one greedy generate (the
image prefix run once per image, exactly ``--new-tokens`` tokens), Grounding DINO (Swin-B) at 800 px, CLIP ViT-L/14 + DINOv2-B
(LR tokens and HR pooled), and the SD VAE posterior of 512 px crops plus the text states of two captions.
Goals on one H100: captions >= 20 images/s, grounding >= 30, embeddings + latents >= 300.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from spasem.profiles.real_size import build_from_config  # noqa: E402


def timed(fn, repeats: int, sync=lambda: None) -> float:
    """Seconds per call of ``fn`` after one warm-up call (mean of ``repeats``)."""
    fn()
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - start) / repeats


def cpu_tiny(args) -> dict[str, float]:
    from spasem.columns import object_array
    from spasem.config import load_config
    from spasem.profiles import resolve_models
    from stages.captions import Captioner
    from stages.embeddings import Embedder
    from stages.encode import Encoder
    from stages.grounding import Grounder

    cfg = load_config(None, [f"models.cache_dir={args.cache}", f"annotate.captions.max_new_tokens={args.new_tokens}"])
    paths = resolve_models(cfg.models)
    rng = np.random.default_rng(0)
    n, hr = args.images, cfg.data.hr_size
    batch = {"key": object_array([f"img{i}" for i in range(n)]), "shard": np.zeros(n, np.int64),
             "hr": rng.integers(0, 256, (n, hr, hr, 3), dtype=np.uint8),
             "lr": rng.integers(0, 256, (n, cfg.data.lr_size, cfg.data.lr_size, 3), dtype=np.uint8)}
    figures = {}
    for name, cls in (("captions", Captioner), ("grounding", Grounder), ("embeddings", Embedder), ("encode", Encoder)):
        stage = cls(cfg, paths)
        out = {}

        def call(stage=stage, out=out, batch=batch):
            out.update(stage(dict(batch)))

        figures[name] = n / timed(call, args.repeats)
        batch = out  # the next stage sees this one's columns, as in the phase
    print(f"tiny profile on CPU ({torch.get_num_threads()} threads), {n} images of {hr} px HR / "
          f"{cfg.data.lr_size} px LR, {args.new_tokens} new tokens:")
    return figures


def gpu_captions(args, dtype) -> float:
    from spasem.vlm.llava import generate_shared_prefix

    model = build_from_config("llava-1.5-7b", dtype, "cuda")
    cfg = model.config
    vision = cfg.vision_config
    n_image = (vision.image_size // vision.patch_size) ** 2
    b = args.batch_captions
    g = torch.Generator().manual_seed(0)
    pad, image = cfg.text_config.pad_token_id, cfg.image_token_index
    # "<s> USER: <image x576>\n" then the high (14 tokens) or low (26 tokens) XPSR prompt + " ASSISTANT:"
    head = torch.cat([torch.tensor([1]), torch.randint(3, 31999, (4,), generator=g), torch.full((n_image,), image),
                      torch.tensor([13])])
    prompts = [torch.cat([head, torch.randint(3, 31999, (n + 5,), generator=g)]) for n in (14, 26)]
    pixels = torch.randn(b, 3, vision.image_size, vision.image_size, generator=g)
    compile = not args.eager
    width = max(len(r) for r in prompts)

    if args.share_prefix:
        @torch.no_grad()
        def run():
            out = generate_shared_prefix(model, pixels, prompts, len(head), pad, args.new_tokens, compile,
                                         min_new_tokens=args.new_tokens)
            assert out.shape == (2 * b, args.new_tokens)
    else:
        ids = torch.full((2 * b, width), pad)
        mask = torch.zeros_like(ids)
        for k, r in enumerate(prompts):  # left padding, as the processor does
            ids[k * b : (k + 1) * b, width - len(r) :] = r
            mask[k * b : (k + 1) * b, width - len(r) :] = 1
        inputs = {"input_ids": ids.cuda(), "attention_mask": mask.cuda(), "pixel_values": pixels.repeat(2, 1, 1, 1).to("cuda", dtype)}
        cache = {"cache_implementation": "static"} if compile else {}

        @torch.no_grad()
        def run():
            out = model.generate(**inputs, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                 do_sample=False, num_beams=1, pad_token_id=pad, **cache)
            assert out.shape[1] == width + args.new_tokens

    seconds = timed(run, args.repeats, torch.cuda.synchronize)
    print(f"  llava-1.5-7b: {b} images x 2 prompts ({2 * b} rows, prompt {width} tokens, shared image prefix: "
          f"{args.share_prefix}) + {args.new_tokens} tokens: {seconds:.2f} s/batch, "
          f"peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    return b / seconds


def gpu_grounding(args, dtype) -> float:
    model = build_from_config("grounding-dino-base", dtype, "cuda")
    b, side = args.batch_grounding, args.grounding_size
    g = torch.Generator().manual_seed(0)
    text = torch.randint(1000, 30000, (b, 24), generator=g)
    text[:, 0], text[:, -1], text[:, 4::5] = 101, 102, 1012  # [CLS] phrase . phrase . ... [SEP]
    inputs = {"pixel_values": torch.randn(b, 3, side, side, generator=g).to("cuda", dtype),
              "pixel_mask": torch.ones(b, side, side, dtype=torch.long, device="cuda"),
              "input_ids": text.cuda(), "attention_mask": torch.ones_like(text).cuda(),
              "token_type_ids": torch.zeros_like(text).cuda()}

    @torch.no_grad()
    def run():
        model(**inputs)

    seconds = timed(run, args.repeats, torch.cuda.synchronize)
    print(f"  grounding-dino-base: {b} images at {side} px, 24 text tokens: {seconds * 1000:.0f} ms/batch")
    torch.cuda.empty_cache()
    return b / seconds


def gpu_embeddings_latents(args, dtype) -> tuple[float, float, float]:
    clip = build_from_config("clip-vit-large-patch14", dtype, "cuda")
    dino = build_from_config("dinov2-base", dtype, "cuda")
    vae = build_from_config("sd15-vae", dtype, "cuda")
    text = build_from_config("sd15-text_encoder", dtype, "cuda")
    b = args.batch_embed
    g = torch.Generator().manual_seed(0)
    lr = torch.randn(b, 3, 224, 224, generator=g).to("cuda", dtype)  # LR and HR both reach the encoders at 224
    hr = torch.randn(b, 3, 224, 224, generator=g).to("cuda", dtype)
    crops = torch.randn(args.batch_vae, 3, 512, 512, generator=g).to("cuda", dtype)
    ids = torch.randint(0, 49407, (2 * args.batch_vae, 77), generator=g).cuda()
    if not args.eager:  # as annotate.embeddings.compile / annotate.encode.compile = true
        torch.backends.cudnn.benchmark = True
        clip, dino = torch.compile(clip), torch.compile(dino)
        vae.to(memory_format=torch.channels_last)
        vae.encoder = torch.compile(vae.encoder)
        crops = crops.contiguous(memory_format=torch.channels_last)

    both = torch.cat([lr, hr])  # LR tokens and HR pooled from one pass per encoder, as the stage does

    @torch.no_grad()
    def embed():
        clip(pixel_values=both), dino(pixel_values=both)

    @torch.no_grad()
    def latents():
        dist = vae.encode(crops).latent_dist
        torch.cat([dist.mean, dist.logvar], 1)
        text(ids)

    e = b / timed(embed, args.repeats, torch.cuda.synchronize)
    v = args.batch_vae / timed(latents, args.repeats, torch.cuda.synchronize)
    print(f"  clip-vit-large-patch14 + dinov2-base: {b} images, LR tokens + HR pooled: {e:.0f} images/s")
    print(f"  sd15 VAE posterior at 512 px + text states of 2 captions: {args.batch_vae} images: {v:.0f} images/s")
    return e, v, 1 / (1 / e + 1 / v)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gpu", action="store_true", help="real-size architectures, random init, bf16, on cuda")
    parser.add_argument("--eager", action="store_true", help="GPU: no torch.compile / static KV cache")
    parser.add_argument("--no-share-prefix", dest="share_prefix", action="store_false",
                        help="GPU: run the image prefix once per prompt instead of once per image")
    parser.add_argument("--only", default="captions,grounding,embeddings", help="GPU parts to run")
    parser.add_argument("--images", type=int, default=8, help="CPU: images per stage call")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=None, help="caption tokens (default: 64 GPU, 16 CPU)")
    parser.add_argument("--batch-captions", type=int, default=64)
    parser.add_argument("--batch-grounding", type=int, default=16)
    parser.add_argument("--grounding-size", type=int, default=800, help="Grounding DINO's input side (its processor: 800)")
    parser.add_argument("--batch-embed", type=int, default=256)
    parser.add_argument("--batch-vae", type=int, default=32)
    parser.add_argument("--cache", default=None, help="CPU: tiny model cache (default: a temporary folder)")
    args = parser.parse_args(argv)
    if not args.gpu:
        args.new_tokens = args.new_tokens or 16
        with tempfile.TemporaryDirectory() as tmp:
            args.cache = args.cache or tmp
            figures = cpu_tiny(args)
        for name, ips in figures.items():
            print(f"  {name:12s} {ips:8.1f} images/s")
        return 0
    if not torch.cuda.is_available():
        print("--gpu needs a CUDA device", file=sys.stderr)
        return 1
    args.new_tokens = args.new_tokens or 64
    torch.backends.cuda.matmul.allow_tf32 = True
    dtype = torch.bfloat16
    only = set(args.only.split(","))
    mode = "eager" if args.eager else "compiled (static KV cache for LLaVA)"
    print(f"real-size architectures, random init, bf16, {mode}, on {torch.cuda.get_device_name()}:")
    results = {}
    if "captions" in only:
        results["captions (both prompts)"] = (gpu_captions(args, dtype), 20)
    if "grounding" in only:
        results["grounding"] = (gpu_grounding(args, dtype), 30)
    if "embeddings" in only:
        e, v, both = gpu_embeddings_latents(args, dtype)
        results["embeddings + latents"] = (both, 300)
    for name, (ips, goal) in results.items():
        print(f"  {name:26s} {ips:8.1f} images/s  (goal >= {goal}: {'met' if ips >= goal else 'NOT met'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
