"""Degradation presets and parameter sampling: one ``DegradationParams`` per sample, from a Generator.

Sampling follows BasicSR's ``RealESRGANDataset.__getitem__`` (kernels) and
``RealESRGANModel.feed_data`` (resize, noise, JPEG, final step) with every ``np.random`` /
``random`` call replaced by draws from an explicit ``np.random.Generator``. The dataclasses
serialize to DESIGN.md's "Degradation record" (``to_record`` / ``from_record``), so an LR can be
re-synthesized from HR + record + seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np

from spasem.degrade.kernels import GAUSSIAN_KINDS, ISOTROPIC_KINDS, make_kernel

RESIZE_MODES = ("up", "down", "keep")
INTERPOLATIONS = ("area", "bilinear", "bicubic")
FINAL_ORDERS = ("resize_sinc_jpeg", "jpeg_resize_sinc")
RECORD_FIELDS = (
    "preset", "blur1", "resize1", "noise1", "jpeg1", "blur2", "resize2", "noise2", "final", "jpeg_final", "usm",
    "ops",
)
# what the resizes and the JPEG are: "torch", the papers' ops (F.interpolate, BasicSR's DiffJPEG at a
# float quality); "opencv", what shards made before them used (cv2.resize, libjpeg at an integer
# quality), the meaning of a record without ``ops``
OPS = ("torch", "opencv")


@dataclass(frozen=True)
class OrderParams:
    """The ranges of one order (first or second) of the degradation."""

    # largest blur kernel; sizes are drawn from the odd numbers 7..kernel_size. BasicSR draws 7..21 in
    # both orders whatever ``blur_kernel_size2`` says (it reads the key and never uses it)
    kernel_size: int
    kernel_prob: tuple[float, ...]  # over spasem.degrade.kernels.GAUSSIAN_KINDS
    sinc_prob: float
    blur_sigma: tuple[float, float]
    betag_range: tuple[float, float]
    betap_range: tuple[float, float]
    resize_prob: tuple[float, float, float]  # up, down, keep
    resize_range: tuple[float, float]
    gaussian_noise_prob: float
    noise_range: tuple[float, float]
    poisson_scale_range: tuple[float, float]
    gray_noise_prob: float
    jpeg_range: tuple[int, int]
    blur_prob: float = 1.0  # second_blur_prob for the second order


@dataclass(frozen=True)
class UsmParams:
    """Unsharp masking of the HR crop before it is degraded (BasicSR ``usm_sharp`` / ``USMSharp``)."""

    weight: float = 0.5
    radius: int = 50  # BasicSR makes it odd: a 51-tap Gaussian, sigma 8 by OpenCV's rule
    threshold: float = 10.0  # on |image - blur| in 0..255 units


@dataclass(frozen=True)
class Preset:
    """A named parameter set: the two orders, the final sinc and the sharpening of the target."""

    name: str
    first: OrderParams
    second: OrderParams
    final_sinc_prob: float = 0.8
    final_sinc_size: int = 21
    usm: UsmParams | None = UsmParams()


_KERNEL_PROB = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)

# xinntao/Real-ESRGAN options/train_realesrgan_x4plus.yml; qyp2000/XPSR utils_data/make_train.py
# hard-codes the same numbers (its ``blur_kernel_size2 = 11`` is never read)
_X4PLUS_FIRST = OrderParams(
    kernel_size=21, kernel_prob=_KERNEL_PROB, sinc_prob=0.1, blur_sigma=(0.2, 3.0), betag_range=(0.5, 4.0),
    betap_range=(1.0, 2.0), resize_prob=(0.2, 0.7, 0.1), resize_range=(0.15, 1.5), gaussian_noise_prob=0.5,
    noise_range=(1.0, 30.0), poisson_scale_range=(0.05, 3.0), gray_noise_prob=0.4, jpeg_range=(30, 95),
)
_X4PLUS_SECOND = replace(
    _X4PLUS_FIRST, blur_sigma=(0.2, 1.5), resize_prob=(0.3, 0.4, 0.3), resize_range=(0.3, 1.2),
    noise_range=(1.0, 25.0), poisson_scale_range=(0.05, 2.5), blur_prob=0.8,
)
# IceClear/StableSR configs/stableSRNew/v2-finetune_text_T_512.yaml: the milder set (an earlier
# version of this file called it "xpsr"); kernel sizes 7..21 in both orders, as BasicSR draws them
_STABLESR_FIRST = replace(
    _X4PLUS_FIRST, blur_sigma=(0.2, 1.5), betag_range=(0.5, 2.0), betap_range=(1.0, 1.5),
    resize_range=(0.3, 1.5), noise_range=(1.0, 15.0), poisson_scale_range=(0.05, 2.0), jpeg_range=(60, 95),
)
_STABLESR_SECOND = replace(
    _X4PLUS_SECOND, blur_sigma=(0.2, 1.0), betag_range=(0.5, 2.0), betap_range=(1.0, 1.5),
    resize_range=(0.6, 1.2), noise_range=(1.0, 12.0), poisson_scale_range=(0.05, 1.0), jpeg_range=(60, 100),
    blur_prob=0.5,
)
# every recipe sharpens the target: Real-ESRGAN degrades ``gt_usm``; XPSR (``use_usm=True``) and
# StableSR (``use_usm: True``) replace the GT by its USM before degrading and train on it
PRESETS: dict[str, Preset] = {
    "xpsr": Preset("xpsr", _X4PLUS_FIRST, _X4PLUS_SECOND),
    "realesrgan": Preset("realesrgan", _X4PLUS_FIRST, _X4PLUS_SECOND),
    "stablesr": Preset("stablesr", _STABLESR_FIRST, _STABLESR_SECOND),
}


@dataclass(frozen=True)
class KernelParams:
    """One blur kernel; fields that a family does not use are None."""

    kind: str
    size: int
    sigma: tuple[float, float] | None = None  # (x, y); None for sinc
    rotation: float | None = None
    beta: float | None = None
    omega: float | None = None

    def kernel(self) -> np.ndarray:
        sx, sy = self.sigma if self.sigma is not None else (None, None)
        return make_kernel(self.kind, self.size, sx, sy, self.rotation, self.beta, self.omega)


@dataclass(frozen=True)
class ResizeParams:
    """Resize of one order: scale relative to the HR (first) or the target LR size (second)."""

    mode: str  # up | down | keep
    scale: float
    interp: str


@dataclass(frozen=True)
class NoiseParams:
    """Additive noise of one order; ``sigma`` for Gaussian, ``scale`` for Poisson, the other None."""

    kind: str  # gaussian | poisson
    gray: bool
    sigma: float | None = None  # gaussian, in 0..255 units
    scale: float | None = None  # poisson


@dataclass(frozen=True)
class JpegParams:
    """JPEG quality: a float in the jpeg range for DiffJPEG (``ops`` torch), an integer for libjpeg."""

    quality: float


@dataclass(frozen=True)
class FinalParams:
    """The last step: resize to the LR size, sinc (None: BasicSR's pulse) and JPEG, in ``order``."""

    order: str  # resize_sinc_jpeg | jpeg_resize_sinc
    sinc: KernelParams | None
    interp: str


@dataclass(frozen=True)
class DegradationParams:
    """Every parameter of one sample's degradation; the noise fields themselves come from the seed."""

    preset: str
    blur1: KernelParams | None
    resize1: ResizeParams
    noise1: NoiseParams
    jpeg1: JpegParams
    blur2: KernelParams | None
    resize2: ResizeParams
    noise2: NoiseParams
    final: FinalParams
    jpeg_final: JpegParams
    usm: UsmParams | None = None  # how the stored HR was sharpened from the crop; None: not at all
    ops: str = "opencv"  # one of OPS; sample_params draws for "torch"

    def to_record(self) -> dict[str, Any]:
        """The JSON-ready record of DESIGN.md (plain floats/ints/bools/str/None)."""
        return {name: _plain(getattr(self, name)) for name in RECORD_FIELDS}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> DegradationParams:
        """Rebuild from a record (e.g. after a JSON round trip).

        A record without ``usm`` comes from shards made before sharpening existed: their HR was not
        sharpened (and their ``xpsr`` meant the set now called ``stablesr``; every parameter is in the
        record, so they re-synthesize all the same). A record without ``ops`` comes from shards made
        with OpenCV's resize and libjpeg ("opencv"). Other unknown or missing fields are errors: a
        field this code does not know may change the LR, so it cannot rebuild it.
        """
        extra = sorted(set(record) - set(RECORD_FIELDS))
        missing = sorted(set(RECORD_FIELDS) - set(record) - {"usm", "ops"})
        if extra or missing:
            raise ValueError(f"degradation record fields differ from DESIGN.md: extra {extra}, missing {missing}; "
                             "a record written by a newer version needs that version to re-synthesize it")
        if record["preset"] not in PRESETS:
            raise ValueError(f"unknown degradation preset {record['preset']!r}; expected one of {sorted(PRESETS)}")
        ops = record.get("ops", "opencv")
        if ops not in OPS:
            raise ValueError(f"unknown degradation ops {ops!r}; expected one of {list(OPS)}")
        final = dict(record["final"])
        final["sinc"] = _kernel_from(final.get("sinc"))
        return cls(
            preset=record["preset"],
            blur1=_kernel_from(record["blur1"]),
            resize1=ResizeParams(**record["resize1"]),
            noise1=NoiseParams(**record["noise1"]),
            jpeg1=JpegParams(**record["jpeg1"]),
            blur2=_kernel_from(record["blur2"]),
            resize2=ResizeParams(**record["resize2"]),
            noise2=NoiseParams(**record["noise2"]),
            final=FinalParams(**final),
            jpeg_final=JpegParams(**record["jpeg_final"]),
            usm=UsmParams(**record["usm"]) if record.get("usm") is not None else None,
            ops=ops,
        )


def _kernel_from(rec: dict[str, Any] | None) -> KernelParams | None:
    if rec is None:
        return None
    rec = dict(rec)
    if rec.get("sigma") is not None:
        rec["sigma"] = (float(rec["sigma"][0]), float(rec["sigma"][1]))
    return KernelParams(**rec)


def _plain(value: Any) -> Any:
    """Dataclasses and numpy scalars to plain JSON types; tuples become lists."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if hasattr(value, "__dataclass_fields__"):
        return {f.name: _plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, (np.bool_,)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    return float(value)


# ---------------------------------------------------------------------------------------- sampling


def _uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def _odd_size(rng: np.random.Generator, largest: int) -> int:
    """An odd kernel size drawn uniformly from 7..largest (BasicSR: ``random.choice(kernel_range)``)."""
    return 2 * int(rng.integers(3, largest // 2 + 1)) + 1


def _beta(rng: np.random.Generator, beta_range: tuple[float, float]) -> float:
    # BasicSR: half the draws below 1, half above (assumes beta_range[0] <= 1 <= beta_range[1])
    if rng.uniform() < 0.5:
        return _uniform(rng, beta_range[0], 1.0)
    return _uniform(rng, 1.0, beta_range[1])


def sample_sinc(rng: np.random.Generator, size: int, omega_range: tuple[float, float]) -> KernelParams:
    return KernelParams(kind="sinc", size=size, omega=_uniform(rng, *omega_range))


def sample_kernel(rng: np.random.Generator, order: OrderParams) -> KernelParams:
    """One blur kernel of an order: sinc with ``sinc_prob``, else one of the six Gaussian families."""
    size = _odd_size(rng, order.kernel_size)
    if rng.uniform() < order.sinc_prob:
        # BasicSR's range for kernels of 7..21: small kernels cannot hold a low cut-off
        low = math.pi / 3 if size < 13 else math.pi / 5
        return sample_sinc(rng, size, (low, math.pi))
    kind = GAUSSIAN_KINDS[int(rng.choice(len(GAUSSIAN_KINDS), p=np.asarray(order.kernel_prob)))]
    sigma_x = _uniform(rng, *order.blur_sigma)
    if kind in ISOTROPIC_KINDS:
        sigma_y, rotation = sigma_x, 0.0
    else:
        sigma_y = _uniform(rng, *order.blur_sigma)
        rotation = _uniform(rng, -math.pi, math.pi)
    beta = None
    if kind.startswith("generalized"):
        beta = _beta(rng, order.betag_range)
    elif kind.startswith("plateau"):
        beta = _beta(rng, order.betap_range)
    return KernelParams(kind=kind, size=size, sigma=(sigma_x, sigma_y), rotation=rotation, beta=beta)


def sample_resize(rng: np.random.Generator, order: OrderParams) -> ResizeParams:
    mode = RESIZE_MODES[int(rng.choice(3, p=np.asarray(order.resize_prob)))]
    if mode == "up":
        scale = _uniform(rng, 1.0, order.resize_range[1])
    elif mode == "down":
        scale = _uniform(rng, order.resize_range[0], 1.0)
    else:
        scale = 1.0
    return ResizeParams(mode=mode, scale=scale, interp=INTERPOLATIONS[int(rng.integers(3))])


def sample_noise(rng: np.random.Generator, order: OrderParams) -> NoiseParams:
    if rng.uniform() < order.gaussian_noise_prob:
        sigma = _uniform(rng, *order.noise_range)
        return NoiseParams(kind="gaussian", gray=bool(rng.uniform() < order.gray_noise_prob), sigma=sigma)
    scale = _uniform(rng, *order.poisson_scale_range)
    return NoiseParams(kind="poisson", gray=bool(rng.uniform() < order.gray_noise_prob), scale=scale)


def sample_jpeg(rng: np.random.Generator, jpeg_range: tuple[int, int]) -> JpegParams:
    # the scripts draw a float: ``out.new_zeros(b).uniform_(*jpeg_range)``, in [low, high)
    return JpegParams(quality=_uniform(rng, *jpeg_range))


def preset_usm(preset: str, usm: bool | None = None) -> UsmParams | None:
    """The sharpening a sample gets: the preset's (``usm`` None), BasicSR's defaults (True), none (False)."""
    if usm is None:
        return PRESETS[preset].usm
    return (PRESETS[preset].usm or UsmParams()) if usm else None


def sample_params(preset: str, rng: np.random.Generator, usm: bool | None = None) -> DegradationParams:
    """Draw every parameter of one second-order degradation from ``rng``.

    ``usm`` (``degradation.usm``) switches the sharpening of the target; it draws nothing from
    ``rng``, so the other parameters of a sample are the same with or without it.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown degradation preset {preset!r}; expected one of {sorted(PRESETS)}")
    p = PRESETS[preset]
    first, second = p.first, p.second
    blur1 = sample_kernel(rng, first)
    resize1, noise1, jpeg1 = sample_resize(rng, first), sample_noise(rng, first), sample_jpeg(rng, first.jpeg_range)
    blur2 = sample_kernel(rng, second) if rng.uniform() < second.blur_prob else None
    resize2, noise2 = sample_resize(rng, second), sample_noise(rng, second)
    order = FINAL_ORDERS[int(rng.integers(2))]
    sinc = None
    if rng.uniform() < p.final_sinc_prob:
        sinc = sample_sinc(rng, _odd_size(rng, p.final_sinc_size), (math.pi / 3, math.pi))
    final = FinalParams(order=order, sinc=sinc, interp=INTERPOLATIONS[int(rng.integers(3))])
    return DegradationParams(
        preset=preset, blur1=blur1, resize1=resize1, noise1=noise1, jpeg1=jpeg1, blur2=blur2,
        resize2=resize2, noise2=noise2, final=final, jpeg_final=sample_jpeg(rng, second.jpeg_range),
        usm=preset_usm(preset, usm), ops="torch",
    )
