"""Spatial-Semantic ControlNet: parameter counts, and forward+backward time and peak memory per sample.

1. Parameter counts (trainable / frozen) of the SD 1.5 and SD 2.1 architectures, built with random
   weights on the meta device from ``configs/models/*.json`` (no download, no memory), for each
   fusion / attention variant, with the trainable part split into the ControlNet branch and the
   new layers (XPSR's DFC heads, ``model.dfc: xpsr``, counted on their own).
2. One training step's forward + backward (``SRObjective``: frozen UNet/VAE, trainable ControlNet,
   every loss on, members as a shard provides them) at ``--size`` (512) HR:
   - default: the tiny profile on CPU, float32; peak memory is the process's resident-set growth
     during the steps, sampled every 2 ms;
   - ``--gpu``: the real-size SD 1.5 / 2.1 architectures in bf16 on CUDA (random weights), with
     ``torch.cuda.max_memory_allocated`` above the loaded models.

    python benchmarks/model.py                      # counts + tiny on CPU
    python benchmarks/model.py --gpu --batch 1 4    # counts + real size, bf16, on the GPU
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from spasem.config.model import LossConfig, ModelConfig  # noqa: E402
from spasem.model.attention import is_new_layer  # noqa: E402
from spasem.model.controlnet import SpatialSemanticControlNet  # noqa: E402
from spasem.profiles.real_size import build_from_config  # noqa: E402

VARIANTS = [("gated", "standard"), ("attention", "standard"), ("gated", "lgcaa"), ("sfa", "standard")]
ENCODERS = {"clip": "clip-vit-large-patch14", "dino": "dinov2-base"}


def millions(module_or_params) -> float:
    params = module_or_params.parameters() if isinstance(module_or_params, torch.nn.Module) else module_or_params
    return sum(p.numel() for p in params) / 1e6


def real_parts(arch: str, dtype: torch.dtype, device: str) -> dict[str, torch.nn.Module]:
    """The frozen real-size parts of ``arch`` (sd15 | sd21) with random weights."""
    parts = {name: build_from_config(f"{arch}-{name}", dtype, device) for name in ("unet", "vae", "text_encoder")}
    parts.update({name: build_from_config(spec, dtype, device) for name, spec in ENCODERS.items()})
    return parts


def controlnet_for(parts: dict, fusion: str, attention: str, device: str) -> SpatialSemanticControlNet:
    with torch.device(device):
        return SpatialSemanticControlNet.from_unet(
            parts["unet"], load_weights_from_unet=device != "meta", fusion=fusion, attention=attention,
            text_dim=parts["text_encoder"].config.hidden_size, clip_dim=parts["clip"].config.hidden_size,
            dino_dim=parts["dino"].config.hidden_size,
        )


def parameter_counts(archs: list[str]) -> None:
    print("== parameters (millions), random weights from configs/models ==")
    print(f"{'arch':6s} {'fusion/attention':20s} {'trainable':>10s} {'branch':>9s} {'new':>8s} {'dfc':>6s} {'frozen':>9s}"
          "  frozen parts")
    for arch in archs:
        parts = real_parts(arch, torch.float32, "meta")
        frozen = sum(millions(m) for m in parts.values())
        detail = " ".join(f"{k}={millions(m):.1f}" for k, m in parts.items())
        for fusion, attention in VARIANTS:
            model = controlnet_for(parts, fusion, attention, "meta")
            total = millions(model)
            new = total - millions(p for n, p in model.named_parameters()
                                   if n.startswith("branch.") and not is_new_layer(n))
            dfc = millions(model.dfc_heads)
            print(f"{arch:6s} {fusion + '/' + attention:20s} {total:10.1f} {total - new:9.1f} {new:8.1f} {dfc:6.2f} "
                  f"{frozen:9.1f}  {detail}")


class PeakRSS:
    """Peak resident-set growth of this process while the block runs (sampled every 2 ms)."""

    def __enter__(self):
        self.base = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _poll(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.growth = self.peak - self.base


def shard_batch(batch: int, size: int, scale: int, text_dim: int, enc: dict, device, k: int) -> dict:
    """A batch as the shards provide it: pixels plus precomputed text states, latents and features."""
    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device)

    boxes = torch.zeros(batch, k, 4)
    boxes[:, :2] = torch.tensor([[0.1, 0.1, 0.6, 0.7], [0.4, 0.2, 0.9, 0.9]])
    return {
        "hr": rnd(batch, 3, size, size).clamp(-1, 1), "lr": rnd(batch, 3, size // scale, size // scale).clamp(-1, 1),
        "caption_high": ["a photo"] * batch, "caption_low": ["blurry"] * batch,
        "phrases": [["a cat", "a dog"]] * batch, "boxes": boxes.to(device),
        "box_mask": (torch.arange(k) < 2).float().expand(batch, k).to(device),
        "text": rnd(batch, 2, 77, text_dim), "latent": rnd(batch, 8, size // 8, size // 8) * 0.5,
        "clip_lr": rnd(batch, enc["clip_tokens"], enc["clip_dim"]), "dino_lr": rnd(batch, enc["dino_tokens"], enc["dino_dim"]),
        "clip_hr": rnd(batch, enc["clip_dim"]), "dino_hr": rnd(batch, enc["dino_dim"]),
    }


def time_steps(objective, batch: dict, steps: int, sync) -> tuple[float, dict]:
    """Seconds per forward+backward (after one warm-up step) and the last losses."""
    for i in range(steps + 1):
        if i == 1:
            sync()
            start = time.perf_counter()
        out = objective(batch, generator=torch.Generator().manual_seed(i))
        out["loss"].backward()
        objective.controlnet.zero_grad(set_to_none=True)
    sync()
    return (time.perf_counter() - start) / steps, {k: round(v.item(), 4) for k, v in out.items()}


def tiny_cpu(args) -> None:
    from spasem.profiles import ensure_tiny
    from spasem.profiles.tiny_sd import CLIP_VISION_DIM, DINO_DIM, ENCODER_IMAGE_SIZE, TEXT_DIM
    from training.objective import SRObjective

    torch.set_num_threads(args.threads)
    paths = ensure_tiny(args.cache_dir, ("sd", "clip_vision", "dinov2"))
    tokens = (ENCODER_IMAGE_SIZE // 8) ** 2 + 1
    enc = {"clip_tokens": tokens, "dino_tokens": tokens, "clip_dim": CLIP_VISION_DIM, "dino_dim": DINO_DIM}
    print(f"== tiny profile, CPU float32, {args.size}x{args.size} HR, {args.threads} thread(s) ==")
    for fusion, attention in VARIANTS:
        obj = SRObjective.from_paths(paths, ModelConfig(fusion=fusion, attention=attention), LossConfig(pixel_w1=0.1))
        for bsz in args.batch:
            batch = shard_batch(bsz, args.size, args.scale, TEXT_DIM, enc, "cpu", obj.model_cfg.max_boxes)
            with PeakRSS() as mem:
                sec, losses = time_steps(obj, batch, args.steps, lambda: None)
            print(f"{fusion + '/' + attention:20s} batch {bsz}: {sec / bsz:7.3f} s/sample fwd+bwd, "
                  f"peak RSS +{mem.growth / 2**20 / bsz:7.0f} MiB/sample  losses {losses}")


def real_gpu(args) -> None:
    from diffusers import DDPMScheduler
    from transformers import CLIPTokenizer

    from spasem.encoders import ImageEncoders
    from spasem.profiles.tiny_sd import build_tokenizer
    from training.objective import SRObjective

    dev, dtype = args.device, torch.bfloat16
    cuda = dev.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    name = torch.cuda.get_device_name() if cuda else "CPU (smoke test)"
    print(f"== real size, {name} bf16, {args.size}x{args.size} HR, "
          f"gradient checkpointing {'on' if args.checkpointing else 'off'} ==")
    with tempfile.TemporaryDirectory() as tmp:
        build_tokenizer(Path(tmp))  # phrases are tokenized online; ids only matter for speed
        tokenizer = CLIPTokenizer.from_pretrained(tmp)
    for arch in args.arch:
        parts = real_parts(arch, dtype, dev)
        scheduler = DDPMScheduler.from_config(build_from_config(f"{arch}-scheduler").config)
        enc = {"clip_tokens": 257, "dino_tokens": 257, "clip_dim": parts["clip"].config.hidden_size,
               "dino_dim": parts["dino"].config.hidden_size}
        for fusion, attention in (v.split("/") for v in args.variants):
            cfg = ModelConfig(fusion=fusion, attention=attention, gradient_checkpointing=args.checkpointing)
            controlnet = controlnet_for(parts, fusion, attention, dev).to(dtype)
            if args.checkpointing:
                controlnet.enable_gradient_checkpointing()
            encoders = ImageEncoders(parts["clip"], None, parts["dino"], None)
            obj = SRObjective(parts["unet"], parts["vae"], parts["text_encoder"], tokenizer, encoders, scheduler,
                              controlnet, cfg, LossConfig(pixel_w1=0.1)).to(dev)
            static = torch.cuda.memory_allocated() if cuda else 0
            for bsz in args.batch:
                batch = shard_batch(bsz, args.size, args.scale, parts["text_encoder"].config.hidden_size, enc,
                                    dev, cfg.max_boxes)
                batch = {k: v.to(dtype) if torch.is_tensor(v) else v for k, v in batch.items()}
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                sec, losses = time_steps(obj, batch, args.steps, sync)
                peak = (torch.cuda.max_memory_allocated() - static) / 2**30 if cuda else float("nan")
                print(f"{arch:5s} {fusion + '/' + attention:20s} batch {bsz}: {1000 * sec / bsz:7.1f} ms/sample "
                      f"fwd+bwd, activations+grads {peak / bsz:5.2f} GiB/sample (models {static / 2**30:.2f} GiB)"
                      f"  loss {losses['loss']}")
            del obj, controlnet
            if cuda:
                torch.cuda.empty_cache()
        del parts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true", help="real-size models in bf16 on CUDA instead of tiny on CPU")
    parser.add_argument("--device", default="cuda", help="device of the --gpu run (cpu: a smoke test)")
    parser.add_argument("--variants", nargs="+", default=[f"{f}/{a}" for f, a in VARIANTS],
                        choices=[f"{f}/{a}" for f, a in VARIANTS])
    parser.add_argument("--arch", nargs="+", default=["sd15", "sd21"], choices=["sd15", "sd21"])
    parser.add_argument("--size", type=int, default=512, help="HR side")
    parser.add_argument("--scale", type=int, default=4)
    parser.add_argument("--batch", type=int, nargs="+", default=[1])
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (tiny run)")
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing in the ControlNet")
    parser.add_argument("--cache-dir", default=".cache/models")
    parser.add_argument("--skip-counts", action="store_true")
    args = parser.parse_args(argv)
    if not args.skip_counts:
        parameter_counts(args.arch)
    if args.gpu:
        real_gpu(args)
    else:
        tiny_cpu(args)


if __name__ == "__main__":
    main()
