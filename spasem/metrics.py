"""Image quality metrics: PSNR/SSIM under two protocols, a CLIP "good photo" score, optional pyiqa metrics.

Protocol ``basicsr`` follows ``basicsr/metrics/psnr_ssim.py`` line for line (border crop, Y channel of
ITU-R BT.601 as MATLAB's ``rgb2ycbcr``, 11x11 Gaussian window with sigma 1.5, 'valid' SSIM map): the
classic SR tables. Protocol ``pyiqa`` is how XPSR's ``test.py`` (``metrics()``, pyiqa 0.1.10) makes its
tables: the same BT.601 Y, no crop, pyiqa's ``psnr`` (``archs/psnr_arch.py``: [0, 1] values,
``10 log10(1 / (mse + 1e-8))``) and ``ssim`` (``archs/ssim_arch.py``: values rounded to integers,
contrast-structure map clipped at 0); its RGB numbers are pyiqa's ``psnr`` and ``ssimc`` defaults.
BasicSR reads images with OpenCV (BGR); here images are RGB, which ``color_order`` says. The CLIP score
and pyiqa metrics load their models by path and never download.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import cv2
import numpy as np

log = logging.getLogger(__name__)

ColorOrder = Literal["rgb", "bgr"]
Protocol = Literal["basicsr", "pyiqa"]
PYIQA_EPS = 1e-8  # pyiqa's psnr: 10 log10(data_range^2 / (mse + eps)), data_range 1

# ITU-R BT.601 for [0, 1] input and [16, 235] output, as MATLAB's rgb2ycbcr and BasicSR use
_Y_RGB = [65.481, 128.553, 24.966]
_YCBCR_RGB = [[65.481, -37.797, 112.0], [128.553, -74.203, -93.786], [24.966, 112.0, -18.214]]
_YCBCR_OFFSET = [16, 128, 128]


def _input_range(img: np.ndarray) -> np.ndarray:
    """BasicSR's _convert_input_type_range: uint8 -> float32 in [0, 1]; float32 stays as it is."""
    if img.dtype == np.uint8:
        return img.astype(np.float32) / 255.0
    if img.dtype == np.float32:
        return img.astype(np.float32)
    raise TypeError(f"expected uint8 or float32 in [0, 1], got {img.dtype}")


def _output_range(img: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """BasicSR's _convert_output_type_range: back to the input's type (rounded for uint8)."""
    if dtype == np.uint8:
        return img.round().astype(np.uint8)
    return (img / 255.0).astype(np.float32)


def rgb2ycbcr(img: np.ndarray, y_only: bool = False, color_order: ColorOrder = "rgb") -> np.ndarray:
    """RGB (or BGR) to YCbCr, BT.601 studio range; uint8 in -> uint8 out, float32 [0, 1] in -> float32 out."""
    dtype = img.dtype
    x = _input_range(img)
    if color_order == "bgr":
        x = x[..., ::-1]
    if y_only:
        out = np.dot(x, _Y_RGB) + 16.0
    else:
        out = np.matmul(x, _YCBCR_RGB) + _YCBCR_OFFSET
    return _output_range(out, dtype)


def bgr2ycbcr(img: np.ndarray, y_only: bool = False) -> np.ndarray:
    """BasicSR's bgr2ycbcr, for images read with OpenCV."""
    return rgb2ycbcr(img, y_only=y_only, color_order="bgr")


def to_y_channel(img: np.ndarray, color_order: ColorOrder = "rgb") -> np.ndarray:
    """The Y channel in [0, 255] (float32, unrounded) as HxWx1; single-channel images pass unchanged."""
    x = img.astype(np.float32) / 255.0
    if x.ndim == 3 and x.shape[2] == 3:
        x = rgb2ycbcr(x, y_only=True, color_order=color_order)[..., None]
    return x * 255.0


def _prepare(img: np.ndarray, img2: np.ndarray, crop_border: int) -> tuple[np.ndarray, np.ndarray]:
    if img.shape != img2.shape:
        raise ValueError(f"image shapes differ: {img.shape} vs {img2.shape}")
    if crop_border < 0:
        raise ValueError(f"crop_border must be >= 0, got {crop_border}")
    if img.ndim == 2:
        img, img2 = img[..., None], img2[..., None]
    if crop_border:
        img = img[crop_border:-crop_border, crop_border:-crop_border, ...]
        img2 = img2[crop_border:-crop_border, crop_border:-crop_border, ...]
    return img, img2


def calculate_psnr(
    img: np.ndarray, img2: np.ndarray, crop_border: int, test_y_channel: bool = False,
    color_order: ColorOrder = "rgb",
) -> float:
    """PSNR in dB of two HxWxC images in [0, 255]; ``inf`` for identical images (BasicSR's formula)."""
    img, img2 = _prepare(img, img2, crop_border)
    if img.size == 0:
        raise ValueError(f"nothing left after cropping {crop_border} px from each border")
    if test_y_channel:
        img, img2 = to_y_channel(img, color_order), to_y_channel(img2, color_order)
    mse = np.mean((img.astype(np.float64) - img2.astype(np.float64)) ** 2)
    if mse == 0:
        return float("inf")
    return float(10.0 * np.log10(255.0 * 255.0 / mse))


def _ssim(img: np.ndarray, img2: np.ndarray, clip_cs: bool = False) -> float:
    """SSIM of one channel (float64, [0, 255]): Gaussian 11x11 sigma 1.5, 'valid' part of the map.

    ``clip_cs`` clips the contrast-structure term at 0, as pyiqa's ``ssim`` does (BasicSR does not).
    """
    c1 = (0.01 * 255) ** 2
    c2 = (0.03 * 255) ** 2
    kernel = cv2.getGaussianKernel(11, 1.5)
    window = np.outer(kernel, kernel.transpose())
    mu1 = cv2.filter2D(img, -1, window)[5:-5, 5:-5]
    mu2 = cv2.filter2D(img2, -1, window)[5:-5, 5:-5]
    mu1_sq, mu2_sq, mu1_mu2 = mu1**2, mu2**2, mu1 * mu2
    sigma1_sq = cv2.filter2D(img**2, -1, window)[5:-5, 5:-5] - mu1_sq
    sigma2_sq = cv2.filter2D(img2**2, -1, window)[5:-5, 5:-5] - mu2_sq
    sigma12 = cv2.filter2D(img * img2, -1, window)[5:-5, 5:-5] - mu1_mu2
    cs_map = (2 * sigma12 + c2) / (sigma1_sq + sigma2_sq + c2)
    if clip_cs:
        cs_map = np.maximum(cs_map, 0.0)
    return float((((2 * mu1_mu2 + c1) / (mu1_sq + mu2_sq + c1)) * cs_map).mean())


def calculate_ssim(
    img: np.ndarray, img2: np.ndarray, crop_border: int, test_y_channel: bool = False,
    color_order: ColorOrder = "rgb",
) -> float:
    """SSIM of two HxWxC images in [0, 255], the mean over channels (BasicSR's formula)."""
    img, img2 = _prepare(img, img2, crop_border)
    if min(img.shape[:2]) < 11:
        raise ValueError(
            f"{img.shape[1]}x{img.shape[0]} after cropping {crop_border} px borders is smaller than the 11x11 SSIM window"
        )
    if test_y_channel:
        img, img2 = to_y_channel(img, color_order), to_y_channel(img2, color_order)
    # float64 after the float32 Y conversion, as BasicSR: E[x^2] - mu^2 in float32 would lose the variance
    img, img2 = img.astype(np.float64), img2.astype(np.float64)
    return float(np.mean([_ssim(img[..., i], img2[..., i]) for i in range(img.shape[2])]))


def pyiqa_psnr(img: np.ndarray, img2: np.ndarray, crop_border: int = 0, test_y_channel: bool = False) -> float:
    """pyiqa's psnr: MSE of the [0, 1] values (Y as XPSR's test.py makes it), ``10 log10(1 / (mse + 1e-8))``."""
    img, img2 = _prepare(img, img2, crop_border)
    if img.size == 0:
        raise ValueError(f"nothing left after cropping {crop_border} px from each border")
    if test_y_channel:
        img, img2 = to_y_channel(img), to_y_channel(img2)
    mse = np.mean(((img.astype(np.float64) - img2.astype(np.float64)) / 255.0) ** 2)
    return float(10.0 * np.log10(1.0 / (mse + PYIQA_EPS)))


def pyiqa_ssim(img: np.ndarray, img2: np.ndarray, crop_border: int = 0, test_y_channel: bool = True) -> float:
    """pyiqa's ssim: BasicSR's window on values rounded to integers, contrast-structure clipped at 0."""
    img, img2 = _prepare(img, img2, crop_border)
    if min(img.shape[:2]) < 11:
        raise ValueError(
            f"{img.shape[1]}x{img.shape[0]} after cropping {crop_border} px borders is smaller than the 11x11 SSIM window"
        )
    if test_y_channel:
        img, img2 = to_y_channel(img), to_y_channel(img2)
    # func_util.preprocess_rgb: x * 255, rounded "to make the input image same as MATLAB"
    img, img2 = np.round(img.astype(np.float64)), np.round(img2.astype(np.float64))
    return float(np.mean([_ssim(img[..., i], img2[..., i], clip_cs=True) for i in range(img.shape[2])]))


def full_reference_metrics(sr: np.ndarray, hr: np.ndarray, crop_border: int,
                           protocol: Protocol = "basicsr") -> dict[str, float]:
    """``psnr_y``, ``ssim_y`` (the literature's numbers) and ``psnr_rgb``, ``ssim_rgb`` of RGB images.

    ``protocol`` picks the formulas (see the module docstring); the border crop is the caller's choice.
    """
    if protocol == "pyiqa":
        return {
            "psnr_y": pyiqa_psnr(sr, hr, crop_border, test_y_channel=True),
            "ssim_y": pyiqa_ssim(sr, hr, crop_border, test_y_channel=True),
            "psnr_rgb": pyiqa_psnr(sr, hr, crop_border),
            "ssim_rgb": pyiqa_ssim(sr, hr, crop_border, test_y_channel=False),
        }
    if protocol != "basicsr":
        raise ValueError(f"protocol must be 'basicsr' or 'pyiqa', got {protocol!r}")
    return {
        "psnr_y": calculate_psnr(sr, hr, crop_border, test_y_channel=True),
        "ssim_y": calculate_ssim(sr, hr, crop_border, test_y_channel=True),
        "psnr_rgb": calculate_psnr(sr, hr, crop_border),
        "ssim_rgb": calculate_ssim(sr, hr, crop_border),
    }


def _pooled(out: Any) -> Any:
    """Features from get_*_features: a tensor in transformers 4, an output with pooler_output in 5."""
    import torch

    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _image_processor(path: str, image_size: int) -> Any:
    # the PIL ("slow") processor: the default one of transformers 5 needs torchvision, which we never require
    try:
        from transformers import CLIPImageProcessorPil as Processor
    except ImportError:
        from transformers import CLIPImageProcessor as Processor
    try:
        return Processor.from_pretrained(path)
    except OSError:
        log.info("no preprocessor_config.json under %s: standard CLIP preprocessing at %d px", path, image_size)
        return Processor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})


class ClipGoodPhoto:
    """``clip_good_photo``: softmax over 100 x cosine similarity with "Good photo." / "Bad photo."; P(good).

    The zero-shot prompt pair of the CLIP-IQA paper, on whatever transformers CLIP ``evaluate.clip_model``
    names (usually a ViT) with its standard 224 px centre-crop preprocessing. It is NOT pyiqa's
    ``clipiqa`` (``archs/clipiqa_arch.py``: OpenAI ResNet-50 CLIP on the full-resolution image, the mean
    over five antonym pairs "Good/bad image", "Sharp/blurry image", ...), which the papers' CLIPIQA
    column is: the values are not comparable with theirs; compare runs of the same model only.
    """

    PROMPTS = ("Good photo.", "Bad photo.")
    LOGIT_SCALE = 100.0

    def __init__(self, path: str, device: str = "cpu"):
        import torch
        from transformers import CLIPModel, CLIPTokenizer

        self.device = device
        self.model = CLIPModel.from_pretrained(path).eval().to(device)
        self.processor = _image_processor(path, self.model.config.vision_config.image_size)
        tokenizer = CLIPTokenizer.from_pretrained(path)
        tokens = tokenizer(list(self.PROMPTS), padding=True, return_tensors="pt").to(device)
        with torch.inference_mode():
            text = _pooled(self.model.get_text_features(**tokens))
        self.text = text / text.norm(dim=-1, keepdim=True)

    def __call__(self, images: Sequence[np.ndarray]) -> list[float]:
        """Scores of RGB uint8 images, one per image."""
        import torch

        if not images:
            return []
        pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"].to(self.device)
        with torch.inference_mode():
            feats = _pooled(self.model.get_image_features(pixel_values=pixels))
            feats = feats / feats.norm(dim=-1, keepdim=True)
            probs = (self.LOGIT_SCALE * feats @ self.text.T).float().softmax(dim=-1)
        return [float(p) for p in probs[:, 0].cpu()]


@contextlib.contextmanager
def _no_downloads() -> Iterator[None]:
    """Make every download path pyiqa uses (torch.hub, the Hugging Face hub) fail instead of fetching."""
    import torch.hub

    def refuse(url: str, *args: Any, **kwargs: Any) -> None:
        raise FileNotFoundError(f"weights not present locally (would download {url}); put them in pyiqa's cache")

    targets = [torch.hub] + [m for n, m in list(sys.modules.items()) if n.startswith("pyiqa") and m is not None]
    saved = [(m, m.download_url_to_file) for m in targets if hasattr(m, "download_url_to_file")]
    hub_constants = sys.modules.get("huggingface_hub.constants")
    offline = getattr(hub_constants, "HF_HUB_OFFLINE", None)
    try:
        for module, _ in saved:
            module.download_url_to_file = refuse
        if hub_constants is not None:
            hub_constants.HF_HUB_OFFLINE = True
        yield
    finally:
        for module, original in saved:
            module.download_url_to_file = original
        if hub_constants is not None:
            hub_constants.HF_HUB_OFFLINE = offline


class PyiqaMetrics:
    """pyiqa metrics (e.g. musiq, maniqa, lpips) whose package and weights are present; others noted, skipped."""

    def __init__(self, names: Sequence[str], device: str = "cpu"):
        self.device = device
        self.metrics: dict[str, Any] = {}
        self.notes: list[str] = []
        if not names:
            return
        try:
            import pyiqa
        except ImportError:
            self.notes.append(f"pyiqa is not installed: {', '.join(names)} skipped (pip install pyiqa)")
            return
        for name in names:
            try:
                with _no_downloads():
                    self.metrics[name] = pyiqa.create_metric(name, device=device, as_loss=False)
            except Exception as exc:  # a missing weight or arch must never stop the evaluation
                self.notes.append(f"{name} skipped: {type(exc).__name__}: {exc}")
        for note in self.notes:
            log.warning(note)

    def __call__(self, sr: np.ndarray, hr: np.ndarray) -> dict[str, float]:
        """Scores of one RGB uint8 image (full-reference metrics also see the reference)."""
        import torch

        def tensor(img: np.ndarray) -> Any:
            return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None].float().div(255).to(self.device)

        out = {}
        with torch.inference_mode():
            for name, metric in self.metrics.items():
                full_ref = getattr(metric, "metric_mode", "NR") == "FR"
                try:
                    score = metric(tensor(sr), tensor(hr)) if full_ref else metric(tensor(sr))
                except Exception as exc:  # e.g. an image below a model's input size: that score only is missing
                    log.warning("%s failed on a %dx%d image: %s", name, sr.shape[1], sr.shape[0], exc)
                    continue
                out[name] = float(score.reshape(-1)[0])
        return out
