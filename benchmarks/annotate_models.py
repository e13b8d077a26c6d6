"""Model-only figures of the annotation models on one GPU: what the models cost, not what a stage costs.

These feed ready-made tensors already on the GPU: no PNG decoding, no image processors, no Ray Data.
``benchmarks/annotate.py`` times the stages and the whole phase as a user runs them; this script
isolates the models for sizing: the real-size architectures of ``configs/models`` with random
weights in bf16, driven the way the stages drive them: LLaVA-1.5-7B with both prompts in one greedy
generate (the image prefix run once per image, exactly ``--new-tokens`` tokens), Grounding DINO
(Swin-B) at 800 px, CLIP ViT-L/14 + DINOv2-B (LR tokens and HR pooled), and the SD VAE posterior of
512 px crops plus the text states of two captions.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from spasem.profiles.real_size import build_from_config  # noqa: E402


def timed(fn, repeats: int, sync=lambda: None) -> float:
    """Median seconds per call of ``fn`` after one warm-up call."""
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


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
    parser.add_argument("--eager", action="store_true", help="no torch.compile / static KV cache")
    parser.add_argument("--no-share-prefix", dest="share_prefix", action="store_false",
                        help="run the image prefix once per prompt instead of once per image")
    parser.add_argument("--only", default="captions,grounding,embeddings", help="parts to run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64, help="caption tokens")
    parser.add_argument("--batch-captions", type=int, default=64)
    parser.add_argument("--batch-grounding", type=int, default=16)
    parser.add_argument("--grounding-size", type=int, default=800, help="Grounding DINO's input side (its processor: 800)")
    parser.add_argument("--batch-embed", type=int, default=256)
    parser.add_argument("--batch-vae", type=int, default=32)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("this benchmark needs a CUDA device", file=sys.stderr)
        return 1
    torch.backends.cuda.matmul.allow_tf32 = True
    dtype = torch.bfloat16
    only = set(args.only.split(","))
    mode = "eager" if args.eager else "compiled (static KV cache for LLaVA)"
    print(f"MODEL-ONLY (no decoding, no processors, no Ray): real-size architectures, random init, bf16, {mode}, "
          f"on {torch.cuda.get_device_name()}:")
    results = {}
    if "captions" in only:
        results["captions (both prompts)"] = gpu_captions(args, dtype)
    if "grounding" in only:
        results["grounding"] = gpu_grounding(args, dtype)
    if "embeddings" in only:
        results["embeddings + latents"] = gpu_embeddings_latents(args, dtype)[2]
    for name, ips in results.items():
        print(f"  {name:26s} {ips:8.1f} images/s (model only)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
