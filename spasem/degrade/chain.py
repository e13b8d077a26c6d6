"""The Real-ESRGAN second-order degradation chain, seeded per sample: crop -> (HR target, LR, parameters).

The HR target is the crop sharpened by unsharp masking when the record's ``usm`` says so (XPSR,
Real-ESRGAN and StableSR all degrade and train on the USM of the crop), rounded to uint8 as it is
stored; the LR is degraded from that stored HR, so HR + record + seed rebuild it exactly.

Seeding: each sample's seed is ``sample_seed(data.seed, key)``, a blake2b hash (the same in every
process, unlike ``hash()``). Parameters are drawn from ``np.random.default_rng([seed, 0])`` and the
noise fields from ``np.random.default_rng([seed, 1])``, so ``resynthesize(hr, record, seed, scale)``
rebuilds the stored LR exactly from HR + record + seed, without re-drawing the parameters.
Exactness holds for the same OpenCV/numpy build and CPU instruction set; across machines an LR may
differ by a grey level where float rounding lands on a .5 boundary.
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np

from spasem.columns import stable_seed
from spasem.degrade.ops import (
    add_gaussian_noise,
    add_poisson_noise,
    blur,
    interpolate,
    jpeg,
    jpeg_torch,
    resize,
    uint8_to_unit,
    unit_to_uint8,
)
from spasem.degrade.params import DegradationParams, KernelParams, UsmParams, sample_params
from spasem.degrade.usm import usm_sharp

PARAMS_STREAM, NOISE_STREAM = 0, 1


def sample_seed(base_seed: int, key: str) -> int:
    """A stable 63-bit seed of (``data.seed``, sample key)."""
    return stable_seed("degrade", int(base_seed), key)


def params_rng(seed: int) -> np.random.Generator:
    """The generator that draws a sample's degradation parameters."""
    return np.random.default_rng([seed, PARAMS_STREAM])


def noise_rng(seed: int) -> np.random.Generator:
    """The generator that draws a sample's noise fields (consumed by ``degrade``)."""
    return np.random.default_rng([seed, NOISE_STREAM])


def _blur(img: np.ndarray, params: KernelParams | None) -> np.ndarray:
    return img if params is None else blur(img, params.kernel())


def _noise(img: np.ndarray, params: Any, rng: np.random.Generator) -> np.ndarray:
    if params.kind == "gaussian":
        return add_gaussian_noise(img, params.sigma, params.gray, rng)
    if params.kind == "poisson":
        return add_poisson_noise(img, params.scale, params.gray, rng)
    raise ValueError(f"unknown noise kind {params.kind!r}; expected gaussian or poisson")


def _interpolate_to(img: np.ndarray, height: int, width: int, interp: str) -> np.ndarray:
    return interpolate(img, interp, size=(height, width))


def _interpolate_by(img: np.ndarray, scale: float, interp: str) -> np.ndarray:
    """``F.interpolate(scale_factor=scale)``: ``floor(h * scale)``, pixels mapped by ``1 / scale``."""
    return interpolate(img, interp, scale=scale)


def _resize_by(img: np.ndarray, scale: float, interp: str) -> np.ndarray:
    """What records without ``ops`` did: a resize to ``int(h * scale)``, mapped by the ratio of the sizes."""
    return resize(img, int(img.shape[0] * scale), int(img.shape[1] * scale), interp)


def degrade(hr: np.ndarray, params: DegradationParams, rng: np.random.Generator, scale: int) -> np.ndarray:
    """The second-order degradation of BasicSR's ``RealESRGANModel.feed_data`` on one RGB uint8 image.

    Returns uint8 ``(H // scale, W // scale, 3)``; ``rng`` supplies only the noise fields.
    """
    if hr.dtype != np.uint8 or hr.ndim != 3 or hr.shape[2] != 3:
        raise ValueError(f"expected an RGB uint8 image HxWx3, got {hr.dtype} {hr.shape}")
    hr = np.ascontiguousarray(hr)
    h, w = hr.shape[:2]
    lr_h, lr_w = h // scale, w // scale
    if lr_h < 1 or lr_w < 1:
        raise ValueError(f"image {w}x{h} is smaller than the scale factor {scale}")
    # a record's ``ops``: "torch", the scripts' F.interpolate and BasicSR's DiffJPEG; "opencv", OpenCV's
    # resize and libjpeg, what records without ``ops`` were made with
    if params.ops == "torch":
        resize_by, resize_to, compress = _interpolate_by, _interpolate_to, jpeg_torch
    elif params.ops == "opencv":
        resize_by, resize_to, compress = _resize_by, resize, jpeg
    else:
        raise ValueError(f"unknown degradation ops {params.ops!r}")
    out = uint8_to_unit(cv2.cvtColor(hr, cv2.COLOR_RGB2BGR))  # the channel order of spasem.degrade.ops
    # first order: blur, resize relative to the HR size, noise, JPEG
    out = _blur(out, params.blur1)
    out = resize_by(out, params.resize1.scale, params.resize1.interp)
    out = _noise(out, params.noise1, rng)
    out = compress(out, params.jpeg1.quality, clipped=True)  # the noise step clipped it
    # second order: the resize is relative to the target LR size, as in BasicSR
    out = _blur(out, params.blur2)
    s2 = params.resize2.scale
    out = resize_to(out, int(h / scale * s2), int(w / scale * s2), params.resize2.interp)
    out = _noise(out, params.noise2, rng)
    final = params.final
    if final.order == "resize_sinc_jpeg":
        out = _blur(resize_to(out, lr_h, lr_w, final.interp), final.sinc)
        out = compress(out, params.jpeg_final.quality)
    elif final.order == "jpeg_resize_sinc":
        out = compress(out, params.jpeg_final.quality, clipped=True)
        out = _blur(resize_to(out, lr_h, lr_w, final.interp), final.sinc)
    else:
        raise ValueError(f"unknown final order {final.order!r}")
    return cv2.cvtColor(unit_to_uint8(out), cv2.COLOR_BGR2RGB)


def sharpen(crop: np.ndarray, usm: UsmParams | None) -> np.ndarray:
    """The HR target of an RGB uint8 crop: BasicSR's ``usm_sharp`` rounded to uint8, or the crop itself."""
    if usm is None:
        return crop
    if crop.dtype != np.uint8 or crop.ndim != 3 or crop.shape[2] != 3:
        raise ValueError(f"expected an RGB uint8 image HxWx3, got {crop.dtype} {crop.shape}")
    # per-channel maths, so RGB needs no conversion; rounding as XPSR's cv2.imwrite of 255 * gt
    # the blend img + mask * (clip(sharp) - img) is >= -1e-7: no negatives to zero
    return unit_to_uint8(usm_sharp(crop, usm.weight, usm.radius, usm.threshold), nonnegative=True)


def synthesize(crop: np.ndarray, preset: str, seed: int, scale: int, usm: bool | None = None
               ) -> tuple[np.ndarray, np.ndarray, DegradationParams]:
    """Sample parameters from ``seed``, sharpen and degrade: the HR target, the LR and the parameters.

    ``usm``: ``degradation.usm`` (None: the preset's sharpening, False: the crop is the target).
    """
    params = sample_params(preset, params_rng(seed), usm)
    hr = sharpen(crop, params.usm)
    return hr, degrade(hr, params, noise_rng(seed), scale), params


def resynthesize(hr: np.ndarray, record: dict[str, Any], seed: int, scale: int) -> np.ndarray:
    """Rebuild the LR of a sample from its stored HR (already sharpened), ``degradation`` record and ``seed``."""
    return degrade(hr, DegradationParams.from_record(record), noise_rng(seed), scale)
