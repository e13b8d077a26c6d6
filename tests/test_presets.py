"""Degradation presets: the published numbers, the sampled distributions, the record and old records."""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
import skimage.data

from spasem.degrade.chain import degrade, noise_rng, resynthesize
from spasem.degrade.kernels import KERNEL_KINDS
from spasem.degrade.params import (
    PRESETS,
    RECORD_FIELDS,
    DegradationParams,
    JpegParams,
    UsmParams,
    sample_params,
)

KERNEL_FIELDS = {"kind", "size", "sigma", "rotation", "beta", "omega"}


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    return skimage.data.astronaut()


def check_kernel(kp, order, kinds: Counter) -> None:
    kinds[kp.kind] += 1
    assert kp.size % 2 == 1 and 7 <= kp.size <= order.kernel_size
    if kp.kind == "sinc":
        low = math.pi / 3 if kp.size < 13 else math.pi / 5
        assert low <= kp.omega <= math.pi and kp.sigma is None
        return
    sx, sy = kp.sigma
    assert order.blur_sigma[0] <= sx <= order.blur_sigma[1] and order.blur_sigma[0] <= sy <= order.blur_sigma[1]
    assert -math.pi <= kp.rotation <= math.pi and kp.omega is None
    if kp.kind.endswith("_iso") or kp.kind == "iso":
        assert sx == sy and kp.rotation == 0.0
    beta_range = {"generalized": order.betag_range, "plateau": order.betap_range}.get(kp.kind.split("_")[0])
    if beta_range is None:
        assert kp.beta is None
    else:
        assert beta_range[0] <= kp.beta <= beta_range[1]


_X4PLUS = {  # xinntao/Real-ESRGAN options/train_realesrgan_x4plus.yml = qyp2000/XPSR utils_data/make_train.py
    "first": dict(kernel_size=21, sinc_prob=0.1, blur_sigma=(0.2, 3), betag_range=(0.5, 4), betap_range=(1, 2),
                  resize_prob=(0.2, 0.7, 0.1), resize_range=(0.15, 1.5), gaussian_noise_prob=0.5,
                  noise_range=(1, 30), poisson_scale_range=(0.05, 3), gray_noise_prob=0.4, jpeg_range=(30, 95)),
    # kernel sizes 7..21 in the second order too: BasicSR never reads blur_kernel_size2 (XPSR sets 11)
    "second": dict(kernel_size=21, sinc_prob=0.1, blur_sigma=(0.2, 1.5), betag_range=(0.5, 4), betap_range=(1, 2),
                   resize_prob=(0.3, 0.4, 0.3), resize_range=(0.3, 1.2), gaussian_noise_prob=0.5,
                   noise_range=(1, 25), poisson_scale_range=(0.05, 2.5), gray_noise_prob=0.4, jpeg_range=(30, 95),
                   blur_prob=0.8),
}
PUBLISHED = {
    "xpsr": _X4PLUS,
    "realesrgan": _X4PLUS,
    "stablesr": {  # IceClear/StableSR configs/stableSRNew/v2-finetune_text_T_512.yaml
        "first": dict(kernel_size=21, sinc_prob=0.1, blur_sigma=(0.2, 1.5), betag_range=(0.5, 2), betap_range=(1, 1.5),
                      resize_prob=(0.2, 0.7, 0.1), resize_range=(0.3, 1.5), gaussian_noise_prob=0.5,
                      noise_range=(1, 15), poisson_scale_range=(0.05, 2), gray_noise_prob=0.4, jpeg_range=(60, 95)),
        "second": dict(kernel_size=21, sinc_prob=0.1, blur_sigma=(0.2, 1.0), betag_range=(0.5, 2), betap_range=(1, 1.5),
                       resize_prob=(0.3, 0.4, 0.3), resize_range=(0.6, 1.2), gaussian_noise_prob=0.5,
                       noise_range=(1, 12), poisson_scale_range=(0.05, 1), gray_noise_prob=0.4, jpeg_range=(60, 100),
                       blur_prob=0.5),
    },
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_presets_carry_the_published_numbers(name):
    preset = PRESETS[name]
    for order_name, expected in PUBLISHED[name].items():
        order = getattr(preset, order_name)
        for key, value in expected.items():
            assert getattr(order, key) == pytest.approx(value), (name, order_name, key)
        assert order.kernel_prob == pytest.approx((0.45, 0.25, 0.12, 0.03, 0.12, 0.03))
    assert preset.final_sinc_prob == 0.8 and preset.final_sinc_size == 21
    assert preset.usm == UsmParams(weight=0.5, radius=50, threshold=10)  # every recipe sharpens the target


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_sampled_parameters_stay_in_the_published_ranges(name):
    preset, n = PRESETS[name], 4000
    rng = np.random.default_rng(11)
    kinds1, kinds2, seen = Counter(), Counter(), Counter()
    sizes = {1: Counter(), 2: Counter()}
    for _ in range(n):
        p = sample_params(name, rng)
        assert p.usm == preset.usm
        check_kernel(p.blur1, preset.first, kinds1)
        sizes[1][p.blur1.size] += 1
        if p.blur2 is None:
            seen["blur2_skipped"] += 1
        else:
            check_kernel(p.blur2, preset.second, kinds2)
            sizes[2][p.blur2.size] += 1
        for k, order, rs, noise, jpeg_q in (
            (1, preset.first, p.resize1, p.noise1, p.jpeg1.quality),
            (2, preset.second, p.resize2, p.noise2, p.jpeg_final.quality),
        ):
            lo, hi = order.resize_range
            assert {"up": 1 <= rs.scale <= hi, "down": lo <= rs.scale <= 1, "keep": rs.scale == 1}[rs.mode]
            seen[rs.mode] += 1
            seen[f"{rs.mode}{k}"] += 1
            seen[rs.interp] += 1
            seen[f"{noise.kind}{k}"] += 1
            if noise.kind == "gaussian":
                assert order.noise_range[0] <= noise.sigma <= order.noise_range[1] and noise.scale is None
            else:
                assert order.poisson_scale_range[0] <= noise.scale <= order.poisson_scale_range[1]
            seen[noise.kind] += 1
            seen[f"gray={noise.gray}"] += 1
            # a float, as the scripts' uniform_(*jpeg_range) draws it for DiffJPEG
            assert isinstance(jpeg_q, float) and order.jpeg_range[0] <= jpeg_q < order.jpeg_range[1]
            seen[f"jpeg{k}"] += jpeg_q
            seen[f"jpeg_int{k}"] += jpeg_q == int(jpeg_q)
        seen[p.final.order] += 1
        if p.final.sinc is None:
            seen["final_sinc_skipped"] += 1
        else:
            assert 7 <= p.final.sinc.size <= 21 and math.pi / 3 <= p.final.sinc.omega <= math.pi
    assert set(kinds1) == set(KERNEL_KINDS) and set(kinds2) == set(KERNEL_KINDS)
    for key in ("up", "down", "keep", "area", "bilinear", "bicubic", "gaussian", "poisson", "gray=True"):
        assert seen[key] > 0, key
    assert abs(seen["blur2_skipped"] / n - (1 - preset.second.blur_prob)) < 0.04
    assert abs(seen["final_sinc_skipped"] / n - (1 - preset.final_sinc_prob)) < 0.04
    assert abs(seen["resize_sinc_jpeg"] / n - 0.5) < 0.04
    assert abs(kinds1["sinc"] / n - preset.first.sinc_prob) < 0.03
    assert abs(kinds1["iso"] / n - 0.9 * preset.first.kernel_prob[0]) < 0.04
    assert abs(seen["gray=True"] / (2 * n) - preset.first.gray_noise_prob) < 0.04
    # BasicSR: random.choice over 7, 9, ..., 21 for BOTH orders (blur_kernel_size2 is never read)
    for k in (1, 2):
        assert set(sizes[k]) == set(range(7, 22, 2)), (k, sorted(sizes[k]))
        total = sum(sizes[k].values())
        assert all(abs(c / total - 1 / 8) < 0.025 for c in sizes[k].values()), (k, sizes[k])
    for k, order in ((1, preset.first), (2, preset.second)):
        for mode, prob in zip(("up", "down", "keep"), order.resize_prob, strict=True):
            assert abs(seen[f"{mode}{k}"] / n - prob) < 0.03, (k, mode)
        assert abs(seen[f"gaussian{k}"] / n - order.gaussian_noise_prob) < 0.03
    for interp in ("area", "bilinear", "bicubic"):  # resize1, resize2, final: uniform over three modes
        assert abs(seen[interp] / (2 * n) - 1 / 3) < 0.03
    for k, order in ((1, preset.first), (2, preset.second)):  # uniform over the range, not integers
        lo, hi = order.jpeg_range
        assert abs(seen[f"jpeg{k}"] / n - (lo + hi) / 2) < 0.05 * (hi - lo), (k, seen[f"jpeg{k}"] / n)
        assert seen[f"jpeg_int{k}"] == 0


def test_record_uses_design_field_names_and_plain_json_types():
    rng = np.random.default_rng(5)
    records = [sample_params("realesrgan", rng).to_record() for _ in range(300)]
    for rec in records:
        assert tuple(rec) == RECORD_FIELDS
        for name in ("blur1", "blur2", "final"):
            kernel = rec[name]["sinc"] if name == "final" else rec[name]
            assert kernel is None or set(kernel) == KERNEL_FIELDS
        for name in ("resize1", "resize2"):
            assert set(rec[name]) == {"mode", "scale", "interp"}
        for name in ("noise1", "noise2"):
            assert set(rec[name]) == {"kind", "gray", "sigma", "scale"}
        assert set(rec["jpeg1"]) == set(rec["jpeg_final"]) == {"quality"}
        assert set(rec["final"]) == {"order", "sinc", "interp"}
        assert rec["usm"] == {"weight": 0.5, "radius": 50, "threshold": 10.0}
        assert rec["ops"] == "torch"
        assert json.loads(json.dumps(rec)) == rec  # plain types only: no numpy scalars, no tuples
        assert DegradationParams.from_record(json.loads(json.dumps(rec))).to_record() == rec
    assert any(r["blur2"] is None for r in records) and any(r["final"]["sinc"] is None for r in records)
    with pytest.raises(ValueError, match="extra"):
        DegradationParams.from_record({**records[0], "blur3": None})
    with pytest.raises(ValueError, match="unknown degradation ops 'pil'"):
        DegradationParams.from_record({**records[0], "ops": "pil"})


def test_records_of_shards_made_before_sharpening_still_load(photo):
    """Old shards have no ``usm`` (and their ``xpsr`` was the milder set) and no ``ops`` (OpenCV's
    resize, libjpeg at an integer quality): they still re-synthesize, with the ops they were made with."""
    hr = np.ascontiguousarray(photo[:128, :128])
    params = sample_params("stablesr", np.random.default_rng(4), usm=False)
    params = replace(params, ops="opencv", jpeg1=JpegParams(quality=round(params.jpeg1.quality)),
                     jpeg_final=JpegParams(quality=round(params.jpeg_final.quality)))
    old = params.to_record()
    del old["usm"], old["ops"]
    old["preset"] = "xpsr"
    back = DegradationParams.from_record(old)
    assert back.usm is None and back.ops == "opencv"
    assert back.blur1 == params.blur1 and back.jpeg_final == params.jpeg_final
    lr = degrade(hr, params, noise_rng(9), 4)
    assert np.array_equal(resynthesize(hr, old, 9, 4), lr)
    # the torch ops give another LR from the same parameters: the record must say which made it
    assert not np.array_equal(degrade(hr, replace(params, ops="torch"), noise_rng(9), 4), lr)


