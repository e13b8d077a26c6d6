"""The Real-ESRGAN degradation: kernels, preset ranges, USM targets, determinism, re-synthesis, stage behaviour."""

from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import skimage.data
from scipy import special, stats

from spasem.columns import object_array
from spasem.config import DataConfig, DegradationConfig
from spasem.degrade.chain import degrade, noise_rng, resynthesize, sample_seed, sharpen, synthesize
from spasem.degrade.jpeg import diffjpeg, quality_factor
from spasem.degrade.kernels import KERNEL_KINDS, make_kernel, sinc_kernel
from spasem.degrade.ops import (
    _banded_filter,
    _fft_blur,
    _separable,
    add_gaussian_noise,
    add_poisson_noise,
    blur,
    interpolate,
    jpeg,
    jpeg_torch,
    normal,
    poisson_levels,
    resize,
)
from spasem.degrade.params import PRESETS, DegradationParams, UsmParams, sample_params
from spasem.degrade.usm import usm_sharp
from stages.degrade import Degrade


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    return skimage.data.astronaut()  # 512x512 RGB uint8, a real photo


def crops(photo: np.ndarray, n: int, size: int = 128) -> list[np.ndarray]:
    return [np.ascontiguousarray(photo[40 * i : 40 * i + size, 30 * i : 30 * i + size]) for i in range(n)]


def stage(hr_size: int = 128, scale: int = 4, seed: int = 0, preset: str = "xpsr", usm: bool | None = None) -> Degrade:
    return Degrade(DataConfig(hr_size=hr_size, scale=scale, seed=seed), DegradationConfig(preset=preset, usm=usm))


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


@pytest.mark.parametrize("shape", [(150, 170), (512, 512), (33, 21)])
def test_every_way_of_applying_a_kernel_equals_direct_correlation(photo, shape):
    """Separable terms, row bands and DFTs (chosen by cost) all give the direct correlation to float32 rounding."""
    img = photo[: shape[0], : shape[1]].astype(np.float32) / 255
    for kernel in (make_kernel("sinc", 21, omega=1.1), make_kernel("aniso", 17, 2.5, 0.7, 0.6),
                   make_kernel("plateau_iso", 9, 1.5, beta=1.5)):
        ref = cv2.filter2D(img, -1, kernel, borderType=cv2.BORDER_REFLECT_101)
        terms = _separable(kernel, 5e-7)
        ways = {"fft": _fft_blur(img, kernel), "banded": _banded_filter(img, kernel),
                "separable": sum(cv2.sepFilter2D(img, -1, row, col, borderType=cv2.BORDER_REFLECT_101)
                                 for col, row in terms)}
        for way, out in ways.items():
            assert out.shape == img.shape and np.abs(out - ref).max() < 2e-6, (way, kernel.shape)


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
    """The ops of records without ``ops`` (OpenCV's resize, libjpeg): kept for old shards."""
    img = photo[:120, :160].astype(np.float32) / 255
    errors = [np.abs(jpeg(img, q) - img).mean() for q in (30, 60, 95)]
    assert errors[0] > errors[1] > errors[2] > 0
    for interp in ("area", "bilinear", "bicubic"):
        assert resize(img, 37, 53, interp).shape == (37, 53, 3)
    assert resize(img, 120, 160, "bicubic") is img  # keep: no resampling at all


def test_diffjpeg_equals_basicsr_diffjpeg():
    """Outputs of BasicSR v1.4.2's own ``DiffJPEG(differentiable=False)`` (basicsr/utils/diffjpeg.py @
    651835a, batched qualities as the scripts pass them) on a 37x53 photo crop, neither side a multiple
    of 16, recorded in tests/data/diffjpeg_basicsr.npz."""
    ref = np.load(Path(__file__).parent / "data" / "diffjpeg_basicsr.npz")
    img = ref["image"].astype(np.float32) / 255
    assert img.shape == (37, 53, 3)
    for quality, expected in zip(ref["qualities"], ref["outputs"], strict=True):
        ours = diffjpeg(img, float(quality))
        off = np.abs(ours - expected)
        # float32 rounding; a coefficient that lands on a rounding boundary may round the other way
        assert np.median(off) < 1e-6 and np.mean(off > 1e-5) < 0.05 and off.max() < 0.05, (quality, off.max())
        bgr = jpeg_torch(np.ascontiguousarray(img[..., ::-1]), float(quality))
        np.testing.assert_allclose(bgr[..., ::-1], ours, atol=1e-5)  # BGR pixels: the matrices reorder
    # DiffJPEG is not libjpeg: floats off the 8-bit grid, and the zero padding darkens the last rows
    out = diffjpeg(img, 40.0)
    assert np.mean(np.abs(out * 255 - np.round(out * 255)) > 1e-3) > 0.5
    assert not np.allclose(out, jpeg(img[..., ::-1], 40)[..., ::-1], atol=0.02)


def test_diffjpeg_quality_factor_is_basicsrs():
    assert quality_factor(50) == pytest.approx(1.0) and quality_factor(75) == pytest.approx(0.5)
    assert quality_factor(25) == pytest.approx(2.0) and quality_factor(30.5) == pytest.approx(5000 / 30.5 / 100)
    for bad in (0, -3, 100, 120):  # at 100 every table entry is zero: DiffJPEG would divide by zero
        with pytest.raises(ValueError, match="JPEG quality"):
            quality_factor(bad)


def test_interpolate_equals_torch_f_interpolate():
    """Every mode, by a size and by a scale (the first order's call), against torch's own op."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    rng = np.random.default_rng(0)
    for trial in range(90):
        h, w = (int(v) for v in rng.integers(9, 200, 2))
        img = rng.random((h, w, 3), dtype=np.float32)
        mode = ("area", "bilinear", "bicubic")[trial % 3]
        extra = {} if mode == "area" else {"align_corners": False}
        pixels = torch.from_numpy(img).permute(2, 0, 1)[None]
        if trial % 2:
            s = float(rng.uniform(0.15, 1.5))
            expected, ours = F.interpolate(pixels, scale_factor=s, mode=mode, **extra), interpolate(img, mode, scale=s)
        else:
            size = tuple(int(v) for v in rng.integers(5, 260, 2))
            expected, ours = F.interpolate(pixels, size=size, mode=mode, **extra), interpolate(img, mode, size=size)
        expected = expected[0].permute(1, 2, 0).numpy()
        assert ours.shape == expected.shape, (mode, h, w, trial)
        # float32 source coordinates computed in another order: ~1e-5 at most, far below a grey level
        np.testing.assert_allclose(ours, expected, atol=6e-5, err_msg=f"{mode} {h}x{w} trial {trial}")
    img = rng.random((40, 30, 3), dtype=np.float32)
    assert interpolate(img, "bicubic", scale=1.0) is img and interpolate(img, "area", size=(40, 30)) is img
    # a scale just above 1 keeps the size: torch copies for bilinear and area, not for bicubic
    pixels = torch.from_numpy(img).permute(2, 0, 1)[None]
    for mode in ("area", "bilinear", "bicubic"):
        extra = {} if mode == "area" else {"align_corners": False}
        expected = F.interpolate(pixels, scale_factor=1.01, mode=mode, **extra)[0].permute(1, 2, 0).numpy()
        np.testing.assert_allclose(interpolate(img, mode, scale=1.01), expected, atol=6e-5, err_msg=mode)
    assert not np.allclose(interpolate(img, "bicubic", scale=1.01), img, atol=1e-3)
    # the scale call differs from resizing to the same size: it maps by 1 / scale, not by the size ratio
    s = 0.151
    by_scale, by_size = interpolate(img, "bilinear", scale=s), interpolate(img, "bilinear", size=(6, 4))
    assert by_scale.shape == by_size.shape == (6, 4, 3) and not np.allclose(by_scale, by_size, atol=1e-3)
    with pytest.raises(ValueError, match="a size or a scale"):
        interpolate(img, "area")


def test_gaussian_draws_follow_the_normal_law():
    draws = normal(np.random.default_rng(0), (400, 500), sigma=3.0)
    assert draws.dtype == np.float32 and draws.shape == (400, 500)
    assert stats.kstest(draws.ravel()[::7] / 3.0, "norm").pvalue > 1e-3
    assert np.abs(draws).max() < 5.8 * 3.0  # 24-bit uniforms cut the tail at 5.77 sigma


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


# ---------------------------------------------------------------------------------- degrade + stage


@pytest.mark.parametrize("scale, shape", [(4, (128, 128)), (2, (128, 128)), (4, (96, 160)), (2, (150, 98))])
def test_output_shape_and_dtype(photo, scale, shape):
    hr = np.ascontiguousarray(photo[: shape[0], : shape[1]])
    for seed in range(6):
        target, lr, _ = synthesize(hr, "realesrgan", seed, scale)
        assert target.shape == hr.shape and target.dtype == np.uint8
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
    for hr, lr, seed, text in zip(out["hr"], out["lr"], out["seed"], out["degradation"], strict=True):
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


# ------------------------------------------------------------------------------------------- USM


def basicsr_usm_sharp(img, weight=0.5, radius=50, threshold=10):
    """BasicSR v1.4.2 ``basicsr/utils/img_process_util.py::usm_sharp``, transcribed line by line."""
    if radius % 2 == 0:
        radius += 1
    blur = cv2.GaussianBlur(img, (radius, radius), 0)
    residual = img - blur
    mask = np.abs(residual) * 255 > threshold
    mask = mask.astype("float32")
    soft_mask = cv2.GaussianBlur(mask, (radius, radius), 0)

    sharp = img + weight * residual
    sharp = np.clip(sharp, 0, 1)
    return soft_mask * sharp + (1 - soft_mask) * img


def xpsr_hr(crop: np.ndarray) -> np.ndarray:
    """The HR XPSR writes: USM of the crop (BGR float [0, 1], as BasicSR reads it), ``cv2.imwrite(255 * gt)``."""
    gt = basicsr_usm_sharp(crop[..., ::-1].astype(np.float32) / 255.0)
    return np.clip(np.rint(255 * gt), 0, 255).astype(np.uint8)[..., ::-1]  # imwrite's saturate_cast rounds


def test_usm_sharp_equals_basicsr(photo):
    for img in (photo, photo[37:300, 5:180], photo[:30, :27], photo[:5, :7]):  # borders reflect again and again
        unit = np.ascontiguousarray(img[..., ::-1]).astype(np.float32) / 255
        ref = basicsr_usm_sharp(unit)
        assert np.abs(usm_sharp(unit) - ref).max() < 1e-6
        assert np.abs(usm_sharp(np.ascontiguousarray(img[..., ::-1])) - ref).max() < 1e-6  # uint8 in
        assert img.shape[0] < 30 or np.abs(ref - unit).max() > 0.05  # it does sharpen
    unit = photo[:96, :96].astype(np.float32) / 255
    assert np.abs(usm_sharp(unit, 0.8, 20, 4) - basicsr_usm_sharp(unit, 0.8, 20, 4)).max() < 1e-6


@pytest.mark.parametrize("shape", [(128, 128), (96, 160), (160, 96)])
def test_stored_hr_is_the_usm_sharpened_crop_and_the_lr_is_made_from_it(photo, shape):
    """A one-row batch, square or not: ``hr`` becomes BasicSR's usm_sharp of the crop, rounded as XPSR saves it."""
    crop = np.ascontiguousarray(photo[100 : 100 + shape[0], 50 : 50 + shape[1]])
    out = stage()({"key": object_array(["one_000"]), "hr": crop[None]})
    hr, lr = out["hr"][0], out["lr"][0]
    assert hr.shape == crop.shape and lr.shape == (shape[0] // 4, shape[1] // 4, 3)
    diff = np.abs(hr.astype(int) - xpsr_hr(crop).astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-4  # float32 rounding may flip a .5 now and then
    assert not np.array_equal(hr, crop)
    record = json.loads(out["degradation"][0])
    assert record["usm"] == {"weight": 0.5, "radius": 50, "threshold": 10.0}
    assert np.array_equal(resynthesize(hr, record, int(out["seed"][0]), 4), lr)
    plain = stage(usm=False)({"key": object_array(["one_000"]), "hr": crop[None]})
    assert np.array_equal(plain["hr"][0], crop) and json.loads(plain["degradation"][0])["usm"] is None
    # the switch draws nothing: the other parameters of the sample stay the same
    assert {**json.loads(plain["degradation"][0]), "usm": None} == {**record, "usm": None}
    assert np.array_equal(sharpen(crop, None), crop)
    assert np.array_equal(sharpen(crop, UsmParams()), hr)


def test_sharpened_photo_is_xpsr_hr_but_for_rare_half_level_ties(photo):
    """A whole 512 photo: the matrix-product blurs move no pixel by more than one level, and few by one."""
    diff = np.abs(sharpen(photo, UsmParams()).astype(int) - xpsr_hr(photo).astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 2e-5  # measured 7.6e-6: 6 of 786,432 values


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
