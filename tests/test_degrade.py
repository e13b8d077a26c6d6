"""The Real-ESRGAN degradation: kernels, preset ranges, determinism, re-synthesis, stage behaviour."""

from __future__ import annotations

import json
import math
from collections import Counter

import cv2
import numpy as np
import pytest
import skimage.data
from scipy import special, stats

from spasem.columns import object_array
from spasem.config import DataConfig, DegradationConfig
from spasem.degrade.chain import degrade, noise_rng, resynthesize, sample_seed, synthesize
from spasem.degrade.kernels import KERNEL_KINDS, make_kernel, sinc_kernel
from spasem.degrade.ops import add_gaussian_noise, add_poisson_noise, blur, jpeg, poisson_levels, resize
from spasem.degrade.params import PRESETS, RECORD_FIELDS, DegradationParams, sample_params
from stages.degrade import Degrade

KERNEL_FIELDS = {"kind", "size", "sigma", "rotation", "beta", "omega"}


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    return skimage.data.astronaut()  # 512x512 RGB uint8, a real photo


def crops(photo: np.ndarray, n: int, size: int = 128) -> list[np.ndarray]:
    return [np.ascontiguousarray(photo[40 * i : 40 * i + size, 30 * i : 30 * i + size]) for i in range(n)]


def stage(hr_size: int = 128, scale: int = 4, seed: int = 0, preset: str = "xpsr") -> Degrade:
    return Degrade(DataConfig(hr_size=hr_size, scale=scale, seed=seed), DegradationConfig(preset=preset))


# ---------------------------------------------------------------------------------------- kernels


@pytest.mark.parametrize("kind", KERNEL_KINDS)
@pytest.mark.parametrize("size", [7, 21])
def test_kernel_normalized_shape_and_centred(kind, size):
    k = make_kernel(kind, size, sigma_x=1.7, sigma_y=0.6, rotation=0.7, beta=1.5, omega=math.pi / 2)
    assert k.shape == (size, size) and k.dtype == np.float32
    assert abs(float(k.sum(dtype=np.float64)) - 1.0) < 1e-5
    assert np.unravel_index(np.argmax(k), k.shape) == (size // 2, size // 2)
    np.testing.assert_allclose(k, k[::-1, ::-1], atol=1e-7)  # point symmetric: no shift of the image


@pytest.mark.parametrize("kind", ["iso", "generalized_iso", "plateau_iso", "sinc"])
def test_isotropic_kernels_are_symmetric_and_ignore_sigma_y(kind):
    k = make_kernel(kind, 15, sigma_x=1.3, sigma_y=2.9, rotation=1.1, beta=0.8, omega=1.2)
    for view in (k.T, k[::-1], k[:, ::-1]):
        np.testing.assert_allclose(k, view, atol=1e-7)
    if kind != "sinc":
        np.testing.assert_array_equal(k, make_kernel(kind, 15, sigma_x=1.3, sigma_y=1.3, beta=0.8))


def test_anisotropic_kernel_rotation_swaps_axes():
    wide = make_kernel("aniso", 21, sigma_x=3.0, sigma_y=0.8, rotation=0.0)
    tall = make_kernel("aniso", 21, sigma_x=3.0, sigma_y=0.8, rotation=math.pi / 2)
    assert wide[10].sum() > wide[:, 10].sum()  # spread along x (columns)
    np.testing.assert_allclose(tall, wide.T, atol=1e-7)


def test_beta_one_and_sinc_match_the_closed_forms():
    gauss = make_kernel("aniso", 13, sigma_x=2.0, sigma_y=1.0, rotation=0.3)
    np.testing.assert_allclose(make_kernel("generalized_aniso", 13, 2.0, 1.0, 0.3, beta=1.0), gauss, atol=1e-7)
    # BasicSR circular_lowpass_kernel: omega * J1(omega r) / (2 pi r), centre omega^2 / (4 pi)
    omega, k = 1.3, sinc_kernel(11, 1.3)
    raw = omega * special.j1(omega * 3.0) / (2 * math.pi * 3.0)
    centre = omega**2 / (4 * math.pi)
    assert k[5, 8] / k[5, 5] == pytest.approx(raw / centre, rel=1e-5)
    assert k.min() < 0  # a true sinc has negative lobes (ringing)


def test_bad_kernel_parameters_are_errors():
    with pytest.raises(ValueError, match="odd"):
        make_kernel("iso", 8, sigma_x=1.0)
    with pytest.raises(ValueError, match="unknown kernel kind"):
        make_kernel("box", 7, sigma_x=1.0)


def test_fast_blur_equals_direct_correlation(photo):
    """Trimming and separable terms change the blurred image by no more than float32 noise."""
    img = photo[:160, :200].astype(np.float32) / 255
    rng = np.random.default_rng(3)
    for _ in range(60):
        params = sample_params("realesrgan", rng)
        for kp in (params.blur1, params.blur2, params.final.sinc):
            if kp is not None:
                k = kp.kernel()
                ref = cv2.filter2D(img, -1, k, borderType=cv2.BORDER_REFLECT_101)
                assert np.abs(blur(img, k) - ref).max() < 1e-5, kp


def test_noise_strength_and_gray_fields(photo):
    flat = np.full((96, 96, 3), 0.5, np.float32)
    rng = np.random.default_rng(2)
    colour = add_gaussian_noise(flat, 10.0, False, rng) - 0.5
    gray = add_gaussian_noise(flat, 10.0, True, rng) - 0.5
    assert colour.std() == pytest.approx(10 / 255, rel=0.03) and abs(colour.mean()) < 1e-3
    assert not np.allclose(colour[..., 0], colour[..., 1])
    np.testing.assert_array_equal(gray[..., 0], gray[..., 2])  # one field for all channels
    shot = add_poisson_noise(flat, 1.0, False, rng) - 0.5
    # one grey level -> vals = 1 "photon" (BasicSR): X ~ Poisson(128/255), and X = 0 clips to black
    assert np.mean(shot == -0.5) == pytest.approx(math.exp(-128 / 255), abs=0.01)
    img = photo[:128, :128].astype(np.float32) / 255
    noisy = add_poisson_noise(img, 2.0, True, rng)
    shot_gray, inside = noisy - img, ((noisy > 0) & (noisy < 1)).all(axis=-1)  # away from clipping
    np.testing.assert_allclose(shot_gray[inside][:, 0], shot_gray[inside][:, 1], atol=1e-6)
    # Var(scale * X / vals) = scale**2 * luma / vals, with vals = 256 for a photo's 8-bit luma
    luma = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)[inside]  # spasem.degrade.ops works in BGR
    assert shot_gray[inside][:, 0].std() == pytest.approx(2.0 * math.sqrt(luma.mean() / 256), rel=0.1)


def test_jpeg_quality_and_resize_sizes(photo):
    img = photo[:120, :160].astype(np.float32) / 255
    errors = [np.abs(jpeg(img, q) - img).mean() for q in (30, 60, 95)]
    assert errors[0] > errors[1] > errors[2] > 0
    for interp in ("area", "bilinear", "bicubic"):
        assert resize(img, 37, 53, interp).shape == (37, 53, 3)
    assert resize(img, 120, 160, "bicubic") is img  # keep: no resampling at all


def test_poisson_sampler_matches_the_poisson_law():
    levels = np.repeat(np.array([0, 1, 7, 64, 200, 255], np.uint8), 60_000)
    draws = poisson_levels(levels, 256, np.random.default_rng(0)).reshape(6, -1)
    assert (draws[0] == 0).all()
    for row, level in zip(draws[1:], (1, 7, 64, 200, 255), strict=True):
        lam = level * 256 / 255
        values, counts = np.unique(row, return_counts=True)
        expected = stats.poisson.pmf(values, lam) * row.size
        keep = expected > 5
        chi2 = float((((counts - expected) ** 2) / expected)[keep].sum())
        assert stats.chi2.sf(chi2, keep.sum() - 1) > 1e-4, (level, chi2)


# ----------------------------------------------------------------------------------------- params


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


PUBLISHED = {  # Real-ESRGAN train_realesrgan_x4plus.yml, and the SeeSR / PASD / XPSR degradation set
    "realesrgan": {
        "first": dict(kernel_size=21, sinc_prob=0.1, blur_sigma=(0.2, 3), betag_range=(0.5, 4), betap_range=(1, 2),
                      resize_prob=(0.2, 0.7, 0.1), resize_range=(0.15, 1.5), gaussian_noise_prob=0.5,
                      noise_range=(1, 30), poisson_scale_range=(0.05, 3), gray_noise_prob=0.4, jpeg_range=(30, 95)),
        "second": dict(kernel_size=21, sinc_prob=0.1, blur_sigma=(0.2, 1.5), betag_range=(0.5, 4), betap_range=(1, 2),
                       resize_prob=(0.3, 0.4, 0.3), resize_range=(0.3, 1.2), gaussian_noise_prob=0.5,
                       noise_range=(1, 25), poisson_scale_range=(0.05, 2.5), gray_noise_prob=0.4, jpeg_range=(30, 95),
                       blur_prob=0.8),
    },
    "xpsr": {
        "first": dict(kernel_size=21, sinc_prob=0.1, blur_sigma=(0.2, 1.5), betag_range=(0.5, 2), betap_range=(1, 1.5),
                      resize_prob=(0.2, 0.7, 0.1), resize_range=(0.3, 1.5), gaussian_noise_prob=0.5,
                      noise_range=(1, 15), poisson_scale_range=(0.05, 2), gray_noise_prob=0.4, jpeg_range=(60, 95)),
        "second": dict(kernel_size=11, sinc_prob=0.1, blur_sigma=(0.2, 1.0), betag_range=(0.5, 2), betap_range=(1, 1.5),
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


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_sampled_parameters_stay_in_the_published_ranges(name):
    preset, n = PRESETS[name], 4000
    rng = np.random.default_rng(11)
    kinds1, kinds2, seen = Counter(), Counter(), Counter()
    for _ in range(n):
        p = sample_params(name, rng)
        check_kernel(p.blur1, preset.first, kinds1)
        if p.blur2 is None:
            seen["blur2_skipped"] += 1
        else:
            check_kernel(p.blur2, preset.second, kinds2)
        for order, rs, noise, jpeg_q in (
            (preset.first, p.resize1, p.noise1, p.jpeg1.quality),
            (preset.second, p.resize2, p.noise2, p.jpeg_final.quality),
        ):
            lo, hi = order.resize_range
            assert {"up": 1 <= rs.scale <= hi, "down": lo <= rs.scale <= 1, "keep": rs.scale == 1}[rs.mode]
            seen[rs.mode] += 1
            seen[rs.interp] += 1
            if noise.kind == "gaussian":
                assert order.noise_range[0] <= noise.sigma <= order.noise_range[1] and noise.scale is None
            else:
                assert order.poisson_scale_range[0] <= noise.scale <= order.poisson_scale_range[1]
            seen[noise.kind] += 1
            seen[f"gray={noise.gray}"] += 1
            assert isinstance(jpeg_q, int) and order.jpeg_range[0] <= jpeg_q <= order.jpeg_range[1]
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
        assert json.loads(json.dumps(rec)) == rec  # plain types only: no numpy scalars, no tuples
        assert DegradationParams.from_record(json.loads(json.dumps(rec))).to_record() == rec
    assert any(r["blur2"] is None for r in records) and any(r["final"]["sinc"] is None for r in records)
    with pytest.raises(ValueError, match="extra"):
        DegradationParams.from_record({**records[0], "blur3": None})


# ---------------------------------------------------------------------------------- degrade + stage


@pytest.mark.parametrize("scale, shape", [(4, (128, 128)), (2, (128, 128)), (4, (96, 160)), (2, (150, 98))])
def test_output_shape_and_dtype(photo, scale, shape):
    hr = np.ascontiguousarray(photo[: shape[0], : shape[1]])
    for seed in range(6):
        lr, _ = synthesize(hr, "realesrgan", seed, scale)
        assert lr.dtype == np.uint8 and lr.shape == (shape[0] // scale, shape[1] // scale, 3)


def test_same_seed_and_key_give_identical_lr_and_different_keys_differ(photo):
    hrs = crops(photo, 4)
    keys = np.asarray([f"photo_{i}_000" for i in range(4)], dtype=object)
    batch = {"key": keys, "hr": np.stack(hrs)}
    first, second = stage()(dict(batch)), stage()(dict(batch))
    assert first["lr"].shape == (4, 32, 32, 3) and first["lr"].dtype == np.uint8
    assert first["lr"].tobytes() == second["lr"].tobytes()
    assert list(first["degradation"]) == list(second["degradation"])
    same_hr = {"key": np.asarray(["a_000", "b_000"], dtype=object), "hr": np.stack([hrs[0], hrs[0]])}
    out = stage()(same_hr)
    assert out["seed"][0] != out["seed"][1] and not np.array_equal(out["lr"][0], out["lr"][1])
    reseeded = stage(seed=1)(dict(batch))
    assert not np.array_equal(reseeded["lr"], first["lr"])
    assert first["seed"].dtype == np.int64 and first["seed"][0] == sample_seed(0, "photo_0_000")
    assert 0 <= sample_seed(2**40, "x") < 2**63


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_resynthesis_from_json_record_is_exact(photo, preset):
    hrs = crops(photo, 8)
    out = stage(preset=preset)({"key": np.asarray([f"k{i}" for i in range(8)], dtype=object), "hr": np.stack(hrs)})
    other_noise = []
    for hr, lr, seed, text in zip(hrs, out["lr"], out["seed"], out["degradation"], strict=True):
        record = json.loads(text)
        assert record["preset"] == preset
        assert np.array_equal(resynthesize(hr, json.loads(json.dumps(record)), int(seed), 4), lr)
        params = DegradationParams.from_record(record)
        other_noise.append(np.array_equal(degrade(hr, params, noise_rng(int(seed) + 1), 4), lr))
    assert not all(other_noise)  # the seed matters beyond the record: it carries the noise fields


def test_bad_rows_become_error_rows_without_stopping_the_batch(photo):
    hrs = crops(photo, 3)
    batch = {
        "key": np.asarray(["good_000", "gray_000", "rejected_000"], dtype=object),
        "hr": object_array([hrs[0], hrs[1][..., 0], hrs[2]]),  # a 2-D array cannot be degraded
        "status": np.asarray(["ok", "ok", "error"], dtype=object),
        "error": np.asarray(["", "", "too small: 30x40"], dtype=object),
        "source": np.asarray(["g.jpg", "h.png", "s.png"], dtype=object),
    }
    out = stage()(batch)
    assert list(out["status"]) == ["ok", "error", "error"]
    assert out["error"][1].startswith("degrade: ") and "HxWx3" in out["error"][1]
    assert out["error"][2] == "too small: 30x40"  # upstream rejects keep their reason
    assert list(out["source"]) == ["g.jpg", "h.png", "s.png"]  # other columns pass through
    assert out["lr"].shape == (3, 32, 32, 3) and not out["lr"][1:].any() and out["lr"][0].any()
    assert json.loads(out["degradation"][0])["preset"] == "xpsr" and out["degradation"][2] == "null"


@pytest.mark.slow
def test_stage_under_ray_data_matches_the_plain_loop(photo, ray_cluster):
    import ray

    hrs = crops(photo, 6)
    keys = [f"ray_{i}_000" for i in range(6)]
    ds = ray.data.from_items([{"key": k, "hr": h, "status": "ok", "error": ""} for k, h in zip(keys, hrs, strict=True)])
    rows = ds.map_batches(
        Degrade,
        fn_constructor_args=(DataConfig(hr_size=128, scale=4, seed=0), DegradationConfig(preset="xpsr")),
        batch_size=4,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=1),
    ).take_all()
    local = stage()({"key": np.asarray(keys, dtype=object), "hr": np.stack(hrs)})
    by_key = {r["key"]: r for r in rows}
    for i, key in enumerate(keys):
        assert np.array_equal(by_key[key]["lr"], local["lr"][i])
        assert by_key[key]["degradation"] == local["degradation"][i]
