"""End-to-end crops/s of prepare's shard phase (read -> crop -> degrade -> tar) with 1 and 2 CPUs.

Each CPU count runs in a fresh process with its own local Ray cluster (``ray.init(num_cpus=N)``,
one CPU per shard builder), on a corpus of real photos from scikit-image's data folder.
Prints crops/s per CPU count and the 1 -> 2 scaling ratio (goal on a 2-core machine: >= 1.7x).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def make_corpus(folder: Path, copies: int) -> int:
    """Real photos at least 512 px on the short side, copied ``copies`` times under distinct names."""
    import skimage.data
    from PIL import Image

    names = ["astronaut.png", "coffee.png", "motorcycle_left.png", "hubble_deep_field.jpg", "retina.jpg",
             "ihc.png", "rocket.jpg"]
    folder.mkdir(parents=True, exist_ok=True)
    count = 0
    for name in names:
        im = Image.open(os.path.join(skimage.data.data_dir, name)).convert("RGB")
        if min(im.size) < 512:
            im = im.resize((max(512, im.width * 512 // min(im.size)), max(512, im.height * 512 // min(im.size))))
        for i in range(copies):
            im.save(folder / f"{Path(name).stem}_{i:03d}.png")
            count += 1
    return count


def run_one(cpus: int, corpus: str, out: str, preset: str, crops: int) -> dict:
    from pipeline.prepare import list_inputs
    from pipeline.shard_phase import plan_shards, run_shard_phase
    from spasem.config import load_config
    from stages.runtime import init_ray

    cfg = load_config(None, [
        "data.hr_size=512", "data.scale=4", "data.min_size=256", f"data.crops_per_image={crops}",
        "data.shard_size=8", f"degradation.preset={preset}", f"ray.num_cpus={cpus}", "prepare.read_num_cpus=1",
        f"prepare.shard_parallelism={cpus}", "prepare.progress=false",
    ], input=corpus, output=out)
    init_ray(cfg.ray, progress=False)
    plan = plan_shards(list_inputs(cfg)[0], cfg.data.shard_size, cfg.data.crops_per_image)
    start = time.perf_counter()
    results = run_shard_phase(cfg, plan, list(range(len(plan))))
    elapsed = time.perf_counter() - start
    crops_done = sum(r["count"] for r in results)
    busy = sum(sum(r["seconds"].values()) for r in results)
    return {"cpus": cpus, "crops": crops_done, "seconds": round(elapsed, 2), "crops_per_s": crops_done / elapsed,
            "busy_s": round(busy, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--copies", type=int, default=30, help="copies of each of the 7 photos (enough that start-up is amortized)")
    parser.add_argument("--crops", type=int, default=2, help="data.crops_per_image")
    parser.add_argument("--preset", default="xpsr")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--corpus", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        out = tempfile.mkdtemp(prefix="bench-prepare-out-")
        try:
            print(json.dumps(run_one(args.child, args.corpus, out, args.preset, args.crops)))
        finally:
            shutil.rmtree(out, ignore_errors=True)
        return
    tmp = Path(tempfile.mkdtemp(prefix="bench-prepare-"))
    try:
        n = make_corpus(tmp / "corpus", args.copies)
        print(f"corpus: {n} photos, {args.crops} crops each, 512 -> 128, preset {args.preset}, "
              f"machine: {os.cpu_count()} cores")
        rows = {}
        for cpus in (1, 2):
            env = dict(os.environ, RAY_AUTH_MODE="disabled")
            proc = subprocess.run(
                [sys.executable, __file__, "--child", str(cpus), "--corpus", str(tmp / "corpus"),
                 "--preset", args.preset, "--crops", str(args.crops)],
                capture_output=True, text=True, env=env, check=True,
            )
            rows[cpus] = json.loads(proc.stdout.strip().splitlines()[-1])
            r = rows[cpus]
            print(f"  {cpus} CPU(s): {r['crops']} crops in {r['seconds']:.2f} s = {r['crops_per_s']:.1f} crops/s "
                  f"(builders busy {r['busy_s']:.2f} s = {r['busy_s'] / (cpus * r['seconds']):.0%} of {cpus} CPU)")
        ratio = rows[2]["crops_per_s"] / rows[1]["crops_per_s"]
        print(f"scaling 1 -> 2 CPUs: {ratio:.2f}x (goal >= 1.7x)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
