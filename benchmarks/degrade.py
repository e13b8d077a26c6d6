"""Degradations per second per core: 512 -> 128 (scale 4) on real photo crops, every preset.

One process, one thread (``cv2.setNumThreads(1)``, single-threaded BLAS), parameters and noise
seeded per sample exactly as the Degrade stage does, the USM sharpening of the HR target included
(``--no-usm`` leaves it out). Per preset: mean / p50 / p95 wall ms per sample, and the process CPU
time per sample with the samples/s/core it gives (CPU time: other jobs on the cores barely move it);
then the USM alone and the chain alone (no USM), and the CPU ms per sample of each step of the
chain. Goal: >= 60 samples/s/core for xpsr with USM. ``--profile`` adds the functions that take
the most time.
"""

from __future__ import annotations

import os

# one core means one thread everywhere, before numpy loads its BLAS
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import cProfile  # noqa: E402
import pstats  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections import defaultdict  # noqa: E402
from pathlib import Path  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import spasem.degrade.chain as chain  # noqa: E402
from spasem.degrade.chain import sample_seed, sharpen, synthesize  # noqa: E402
from spasem.degrade.params import PRESETS, UsmParams  # noqa: E402

PHOTOS = ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "motorcycle_left.png",
          "hubble_deep_field.jpg", "retina.jpg", "ihc.png")


def photo_crops(count: int, size: int, seed: int = 0) -> list[np.ndarray]:
    """``count`` random ``size`` crops from scikit-image's real photos (small ones enlarged first)."""
    import skimage.data
    import skimage.io

    rng = np.random.default_rng(seed)
    photos = []
    for name in PHOTOS:  # the files bundled with scikit-image (no download)
        img = np.ascontiguousarray(skimage.io.imread(os.path.join(skimage.data.data_dir, name))[..., :3])
        short = min(img.shape[:2])
        if short < size:
            f = size / short
            img = cv2.resize(img, (round(img.shape[1] * f) + 1, round(img.shape[0] * f) + 1), interpolation=cv2.INTER_CUBIC)
        photos.append(img)
    out = []
    for i in range(count):
        img = photos[i % len(photos)]
        y = int(rng.integers(0, img.shape[0] - size + 1))
        x = int(rng.integers(0, img.shape[1] - size + 1))
        out.append(np.ascontiguousarray(img[y : y + size, x : x + size]))
    return out


def run(preset: str, crops: list[np.ndarray], scale: int, usm: bool | None, warmup: int = 10
        ) -> tuple[np.ndarray, float]:
    """Wall seconds per sample for each crop, and the process CPU seconds of them all."""
    for i in range(warmup):
        synthesize(crops[i % len(crops)], preset, sample_seed(1, f"warmup{i}"), scale, usm)
    times = np.empty(len(crops))
    cpu_start = time.process_time()
    for i, hr in enumerate(crops):
        start = time.perf_counter()
        synthesize(hr, preset, sample_seed(0, f"bench_{i:05d}"), scale, usm)
        times[i] = time.perf_counter() - start
    return times, time.process_time() - cpu_start


def run_usm(crops: list[np.ndarray]) -> float:
    """Process CPU seconds per crop of the USM sharpening alone."""
    sharpen(crops[0], UsmParams())
    cpu_start = time.process_time()
    for hr in crops:
        sharpen(hr, UsmParams())
    return (time.process_time() - cpu_start) / len(crops)


# the steps of spasem.degrade.chain, by the names it calls them
STEPS = {"sample_params": "parameters", "usm_sharp": "usm (2 blurs 51 taps + mask/blend)",
         "interpolate": "resizes (3, F.interpolate)", "add_gaussian_noise": "gaussian noise",
         "add_poisson_noise": "poisson noise", "jpeg_torch": "jpeg (2 DiffJPEG round trips)", "uint8_to_unit": "uint8 -> float", "unit_to_uint8": "float -> uint8"}
BLURS = ("blur order 1", "blur order 2", "final sinc")


def run_steps(preset: str, crops: list[np.ndarray], scale: int, usm: bool | None) -> dict[str, float]:
    """Process CPU seconds per sample of each step, timed by wrapping the chain's own functions."""
    spent: dict[str, float] = defaultdict(float)
    blur_calls = [0]

    def timed(label, fn):
        def wrapper(*args, **kwargs):
            start = time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[label] += time.process_time() - start
        return wrapper

    def blur_step(img, params):  # chain._blur runs blur1, blur2 and the final sinc, in this order
        label = BLURS[blur_calls[0] % 3]
        blur_calls[0] += 1
        return timed(label, original["_blur"])(img, params)

    original = {name: getattr(chain, name) for name in (*STEPS, "_blur")}
    for name, label in STEPS.items():
        setattr(chain, name, timed(label, original[name]))
    chain._blur = blur_step
    try:
        start = time.process_time()
        for i, hr in enumerate(crops):
            synthesize(hr, preset, sample_seed(0, f"bench_{i:05d}"), scale, usm)
        total = time.process_time() - start
    finally:
        for name, fn in original.items():
            setattr(chain, name, fn)
    spent["other (colour order, copies, calls)"] = total - sum(spent.values())
    return {label: seconds / len(crops) for label, seconds in spent.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=400, help="degradations per preset")
    parser.add_argument("--hr-size", type=int, default=512)
    parser.add_argument("--scale", type=int, default=4)
    parser.add_argument("--presets", nargs="+", default=sorted(PRESETS), choices=sorted(PRESETS))
    parser.add_argument("--no-usm", action="store_true", help="leave out the USM sharpening of the HR target")
    parser.add_argument("--profile", action="store_true", help="print the top functions by own time")
    args = parser.parse_args(argv)

    cv2.setNumThreads(1)
    crops = photo_crops(args.samples, args.hr_size)
    lr = args.hr_size // args.scale
    usm = False if args.no_usm else None
    print(f"degrade {args.hr_size} -> {lr} (scale {args.scale}), {args.samples} real photo crops per preset, "
          f"USM {'off' if args.no_usm else 'on'}, 1 process, cv2 threads={cv2.getNumThreads()}, opencv {cv2.__version__}, numpy {np.__version__}")
    # wall time is what a pipeline sees; CPU time is steadier when other jobs share the cores
    print(f"{'preset':<12}{'mean ms':>9}{'p50 ms':>9}{'p95 ms':>9}{'samples/s/core':>16}{'cpu ms':>9}"
          f"{'samples/s/core (cpu)':>22}")
    for preset in args.presets:
        times, cpu = run(preset, crops, args.scale, usm)
        mean, cpu_mean = times.mean(), cpu / len(times)
        print(f"{preset:<12}{mean * 1e3:>9.2f}{np.percentile(times, 50) * 1e3:>9.2f}"
              f"{np.percentile(times, 95) * 1e3:>9.2f}{1.0 / mean:>16.1f}{cpu_mean * 1e3:>9.2f}{1.0 / cpu_mean:>22.1f}")
    if not args.no_usm:
        usm_cpu = run_usm(crops[:100])
        print(f"{'usm alone':<12}{'':>9}{'':>9}{'':>9}{'':>16}{usm_cpu * 1e3:>9.2f}{1.0 / usm_cpu:>22.1f}")
        _, chain_cpu = run("xpsr", crops, args.scale, False, warmup=0)
        chain_cpu /= len(crops)
        print(f"{'chain alone':<12}{'':>9}{'':>9}{'':>9}{'':>16}{chain_cpu * 1e3:>9.2f}{1.0 / chain_cpu:>22.1f}"
              "   (xpsr without USM)")
    print("CPU ms per sample by step:")
    steps = {preset: run_steps(preset, crops, args.scale, usm) for preset in args.presets}
    labels = sorted({label for per in steps.values() for label in per}, key=lambda k: -steps[args.presets[0]].get(k, 0))
    print(f"{'step':<40}" + "".join(f"{p:>12}" for p in args.presets))
    for label in labels:
        print(f"{label:<40}" + "".join(f"{steps[p].get(label, 0.0) * 1e3:>12.2f}" for p in args.presets))
    print(f"{'total':<40}" + "".join(f"{sum(steps[p].values()) * 1e3:>12.2f}" for p in args.presets))
    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        for preset in args.presets:
            run(preset, crops[:100], args.scale, usm, warmup=0)
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    main()
