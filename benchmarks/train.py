"""Training throughput: steps/s, samples/s, data-wait share and peak memory of ``training.launch``.

Default (CPU): the tiny profile, 2 gloo workers, ZeRO-2, on shards prepared from scikit-image photos;
the figures come from the run's own ``metrics.jsonl`` (median of the logged intervals; the first,
start-up, is left out), and the CPU seconds of the driver and the local Ray cluster under it per
trained sample. Goal: the Ray Data loader keeps up, data wait < 10% of step time.

``--gpu``: the real-size SD 1.5 UNet/VAE/text encoder, CLIP ViT-L/14 and DINOv2-base from
``configs/models`` (random init, no downloads) + the Spatial-Semantic ControlNet, bf16, ZeRO-2, 512 px.
It first searches the largest per-GPU batch that fits (MODEL ONLY: one process, synthetic batches
already on the GPU), then runs ``training.launch`` on real 512 px shards with that batch for loader figures.
Goal on one H100: >= 10 samples/s (the original ControlNet trains at ~5.3 samples/s on an A100-40G).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

PHOTOS = ["astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "motorcycle_left.png", "retina.jpg",
          "hubble_deep_field.jpg", "ihc.png"]


def make_corpus(folder: Path, copies: int, min_side: int) -> int:
    import skimage.data
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    n = 0
    for name in PHOTOS:
        im = Image.open(os.path.join(skimage.data.data_dir, name)).convert("RGB")
        if min(im.size) < min_side:
            k = min_side / min(im.size)
            im = im.resize((round(im.width * k) + 1, round(im.height * k) + 1), Image.BICUBIC)
        for i in range(copies):
            im.save(folder / f"{Path(name).stem}_{i:03d}.png")
            n += 1
    return n


def prepare(work: Path, copies: int, hr_size: int, shard_size: int, extra: list[str]) -> Path:
    from pipeline.prepare import main as prepare_main

    photos, out = work / "photos", work / "prepared"
    make_corpus(photos, copies, hr_size)
    sets = [f"data.hr_size={hr_size}", f"data.min_size={hr_size}", f"data.shard_size={shard_size}",
            "prepare.phases=[shard]", "prepare.progress=false", *extra]
    assert prepare_main(["--input", str(photos), "--output", str(out)] + [a for s in sets for a in ("--set", s)]) == 0
    return out


class TreeCpu:
    """Process CPU seconds of this driver and every process under it (the local Ray cluster it starts:
    GCS, raylet, Ray Data and Train workers), sampled every ``period`` s so exited workers still count."""

    def __init__(self, period: float = 0.5):
        import threading

        self.period, self.seen, self._stop = period, {}, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        import psutil

        me = psutil.Process()
        for proc in [me, *me.children(recursive=True)]:
            try:
                t = proc.cpu_times()
                self.seen[proc.pid] = max(self.seen.get(proc.pid, 0.0), t.user + t.system)
            except psutil.Error:  # exited between the listing and the read
                pass

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self._sample()

    def __enter__(self) -> TreeCpu:
        self._sample()
        self.start = sum(self.seen.values())
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        self.seconds = sum(self.seen.values()) - self.start


def summarize(run: Path, rows_per_step: int) -> dict[str, float]:
    """Median over the logged intervals (the first, start-up, left out) of the run's own metrics."""
    from statistics import median

    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    timed = [m for m in lines if "samples_per_s" in m][1:]  # the first interval holds start-up
    if not timed:
        raise RuntimeError(f"too few logged steps in {run}/metrics.jsonl; raise --steps")
    samples_per_s = median(m["samples_per_s"] for m in timed)
    return {
        "steps_per_s": samples_per_s / rows_per_step,
        "samples_per_s": samples_per_s,
        "data_wait_share": median(m["data_wait_share"] for m in timed),
        "peak_host_mb": max(m.get("peak_host_mb", 0.0) for m in lines),
        "peak_gpu_mb": max(m.get("peak_gpu_mb", 0.0) for m in lines),
        "final_loss": lines[-1].get("loss", float("nan")),
    }


def launch(prepared: Path, run: Path, sets: list[str]) -> float:
    """Run ``training.launch`` (Ray Data shard streams into Ray Train workers); returns its CPU seconds."""
    from training.launch import main as launch_main

    args = ["--input", str(prepared), "--output", str(run)] + [a for s in sets for a in ("--set", s)]
    with TreeCpu() as cpu:
        if launch_main(args) != 0:
            raise RuntimeError("training.launch failed")
    return cpu.seconds


def cpu_benchmark(args: argparse.Namespace, work: Path) -> None:
    prepared = prepare(work, args.copies, 128, 8, ["ray.num_cpus=4"])
    workers, batch = 2, args.batch_size
    cpu = launch(prepared, work / "run", [
        f"train.num_workers={workers}", f"train.batch_size={batch}", "train.cpus_per_worker=0.5",
        f"train.max_steps={args.steps}", f"train.log_every={args.log_every}", "train.checkpoint_every=100000",
        "train.export_with_checkpoint=false", "deepspeed.stage=2", "ray.num_cpus=4",
    ])
    r = summarize(work / "run", batch * workers)
    samples = args.steps * batch * workers
    print(f"tiny profile on CPU, training.launch through Ray Data: {workers} gloo workers x batch {batch}, 128 px, "
          f"ZeRO-2, {args.steps} steps (median of the logged intervals after the first)")
    print(f"  {r['steps_per_s']:.2f} steps/s, {r['samples_per_s']:.1f} samples/s, "
          f"{1000 * cpu / samples:.0f} CPU ms per sample (whole run, start-up included, all processes), "
          f"data wait {100 * r['data_wait_share']:.1f}% of step time (goal < 10%), "
          f"peak host memory per worker {r['peak_host_mb']:.0f} MiB")


def build_real_size(target: Path) -> dict[str, str]:
    """SD 1.5 + CLIP ViT-L/14 + DINOv2-base with random weights, saved in the layouts from_paths loads."""
    import torch
    from transformers import BitImageProcessor, CLIPImageProcessor

    from spasem.profiles import build_once
    from spasem.profiles.real_size import build_from_config
    from spasem.profiles.tiny_sd import build_tokenizer

    def build(root: Path) -> None:
        sd = root / "sd"
        for sub in ("unet", "vae", "text_encoder", "scheduler"):
            model = build_from_config(f"sd15-{sub}", torch.float32, "cpu")
            model.save_pretrained(str(sd / sub))
            del model
        build_tokenizer(sd / "tokenizer")  # CLIP's BPE tokenizer class with a small real vocabulary (no download)
        for name, folder, proc in (
            ("clip-vit-large-patch14", "clip_vision", CLIPImageProcessor(size={"shortest_edge": 224},
                                                                          crop_size={"height": 224, "width": 224})),
            ("dinov2-base", "dinov2", BitImageProcessor(size={"shortest_edge": 256},
                                                        crop_size={"height": 224, "width": 224},
                                                        image_mean=[0.485, 0.456, 0.406],
                                                        image_std=[0.229, 0.224, 0.225])),
        ):
            model = build_from_config(name, torch.float32, "cpu")
            model.save_pretrained(str(root / folder))
            proc.save_pretrained(str(root / folder))

    build_once(target, build, "real-size SD 1.5 + CLIP ViT-L/14 + DINOv2-base")
    return {"sd": str(target / "sd"), "clip_vision": str(target / "clip_vision"), "dinov2": str(target / "dinov2")}


def largest_batch(paths: dict[str, str], sizes: list[int], steps: int) -> list[dict[str, float]]:
    """One process, one GPU: samples/s and peak memory per batch size on synthetic 512 px batches, until OOM."""
    import torch
    import torch.distributed as dist

    from spasem.config import load_config
    from training.runner import Runner, set_accelerator

    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29533")
    set_accelerator(True)
    dist.init_process_group("nccl")
    cfg = load_config(overrides=["deepspeed.stage=2", "deepspeed.precision=bf16", "train.use_gpu=true",
                                 "models.profile=real", "train.num_workers=1"])
    device = torch.device("cuda", 0)
    runner = Runner(cfg, paths, 0, 1, device)
    results = []
    for b in sizes:
        batch = {"hr": torch.rand(b, 3, 512, 512, device=device) * 2 - 1,
                 "lr": torch.rand(b, 3, 128, 128, device=device) * 2 - 1,
                 "caption_high": ["a photo of a cat on a sofa"] * b, "caption_low": ["sharp, clean"] * b,
                 "phrases": [["cat", "sofa"]] * b,
                 "boxes": torch.tensor([[0.1, 0.1, 0.5, 0.6], [0.0, 0.4, 1.0, 1.0]] + [[0.0] * 4] * 6,
                                       device=device).expand(b, 8, 4).contiguous(),
                 "box_mask": torch.tensor([1.0, 1.0] + [0.0] * 6, device=device).expand(b, 8).contiguous()}
        torch.cuda.reset_peak_memory_stats()
        try:
            runner.train_step([batch])  # warm-up (kernels, allocator)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(steps):
                runner.train_step([batch])
            torch.cuda.synchronize()
        except torch.cuda.OutOfMemoryError:
            print(f"  batch {b}: out of memory")
            break
        dt = (time.perf_counter() - t0) / steps
        r = {"batch": b, "steps_per_s": 1 / dt, "samples_per_s": b / dt,
             "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20}
        print(f"  batch {b}: {r['steps_per_s']:.2f} steps/s, {r['samples_per_s']:.1f} samples/s, "
              f"peak {r['peak_gpu_mb'] / 1024:.1f} GiB", flush=True)
        results.append(r)
    return results


def gpu_benchmark(args: argparse.Namespace, work: Path) -> None:
    paths = build_real_size(Path(args.models_dir))
    print("MODEL ONLY (synthetic batches already on the GPU, no Ray Data): real-size SD 1.5 + Spatial-Semantic "
          "ControlNet (random init), bf16, ZeRO-2, 512 px, 1 GPU")
    results = largest_batch(paths, [int(b) for b in args.batch_sizes.split(",")], args.gpu_steps)
    if not results:
        print("  not even the smallest batch fits")
        return
    best = max(results, key=lambda r: r["samples_per_s"])
    print(f"largest batch that fits: {results[-1]['batch']}; best {best['samples_per_s']:.1f} samples/s at batch "
          f"{best['batch']} (goal >= 10; original ControlNet ~5.3 on A100-40G)")
    if args.skip_loader:
        return
    prepared = prepare(work, args.copies, 512, 64, [])
    cpu = launch(prepared, work / "run", [
        "train.num_workers=1", "train.use_gpu=true", f"train.batch_size={best['batch']}",
        "train.cpus_per_worker=4", f"train.max_steps={args.steps}", f"train.log_every={args.log_every}",
        "train.checkpoint_every=100000", "train.export_with_checkpoint=false", "deepspeed.stage=2",
        "deepspeed.precision=bf16", "models.profile=real", f"models.sd={paths['sd']}",
        f"models.clip_vision={paths['clip_vision']}", f"models.dinov2={paths['dinov2']}", "models.device=cuda",
    ])
    r = summarize(work / "run", best["batch"])
    print(f"through training.launch (Ray Data from 512 px shards): {r['samples_per_s']:.1f} samples/s, "
          f"{1000 * cpu / (args.steps * best['batch']):.0f} CPU ms per sample (whole run), "
          f"data wait {100 * r['data_wait_share']:.1f}%, peak GPU {r['peak_gpu_mb'] / 1024:.1f} GiB")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="real-size models on one GPU (see above)")
    parser.add_argument("--copies", type=int, default=4, help="copies of each of the 8 photos")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps of the launched run")
    parser.add_argument("--log-every", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=2, help="per-worker batch of the CPU run")
    parser.add_argument("--batch-sizes", default="4,8,12,16,24,32,40,48,64", help="--gpu: batch sizes to try")
    parser.add_argument("--gpu-steps", type=int, default=5, help="--gpu: timed steps per batch size")
    parser.add_argument("--skip-loader", action="store_true", help="--gpu: only the batch search")
    parser.add_argument("--models-dir", default=str(ROOT / ".cache" / "real-size"), help="--gpu: where models are built")
    parser.add_argument("--keep", default=None, help="keep the work folder here")
    args = parser.parse_args(argv)
    work = Path(args.keep or tempfile.mkdtemp(prefix="bench-train-"))
    try:
        (gpu_benchmark if args.gpu else cpu_benchmark)(args, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
