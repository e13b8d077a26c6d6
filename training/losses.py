"""The training losses of the Spatial-Semantic ControlNet, as pure functions of tensors.

- ``diffusion_target`` / ``diffusion_loss``: epsilon or v-prediction MSE, the target chosen by the
  scheduler config's ``prediction_type``.
- ``predicted_x0``: the clean latents the model's prediction implies (DDPM's ``pred_original_sample``).
- ``xpsr_dfc_terms``: XPSR's degradation-free constraint (qyp2000/XPSR ``train.py``, the loop after
  ``mse_loss``): L1 of each DFC head's prediction against the HR pixels / HR latents bilinearly resized
  to its size, one term per head (XPSR weights each by ``lambda_d = 0.05`` and sums them).
- ``degradation_free_loss`` (``model.dfc: x0``): L1 between multi-scale pyramids of the predicted x0
  and the HR, in latent space and (decoded) pixel space.
- ``semantic_loss``: restored LR encoder features vs the recorded HR features (cosine distance).
- ``wasserstein1_pixels``: DPACM's pixel-distribution loss, the exact 1-D Wasserstein-1 distance
  between the value distributions of two images per channel (mean absolute difference of sorted values).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def _alpha(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``alphas_cumprod[t]`` broadcast to ``like`` (float32 maths, then ``like``'s dtype)."""
    a = alphas_cumprod.to(like.device, torch.float32)[timesteps.to(like.device).long()]
    return a.view(-1, *([1] * (like.ndim - 1)))


def diffusion_target(latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                     alphas_cumprod: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """What the network should predict: ``noise`` (epsilon) or ``sqrt(a) noise - sqrt(1-a) x0`` (v)."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        a = _alpha(alphas_cumprod, timesteps, latents)
        return (a.sqrt() * noise.float() - (1 - a).sqrt() * latents.float()).to(noise.dtype)
    raise ValueError(f"unsupported prediction_type {prediction_type!r}; use 'epsilon' or 'v_prediction'")


def diffusion_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error in float32."""
    return F.mse_loss(pred.float(), target.float())


def predicted_x0(noisy: torch.Tensor, pred: torch.Tensor, timesteps: torch.Tensor,
                 alphas_cumprod: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """The clean latents implied by the prediction at ``timesteps`` (differentiable in ``pred``)."""
    a = _alpha(alphas_cumprod, timesteps, noisy)
    x, p = noisy.float(), pred.float()
    if prediction_type == "epsilon":
        return (x - (1 - a).sqrt() * p) / a.sqrt()
    if prediction_type == "v_prediction":
        return a.sqrt() * x - (1 - a).sqrt() * p
    raise ValueError(f"unsupported prediction_type {prediction_type!r}; use 'epsilon' or 'v_prediction'")


def pyramid(x: torch.Tensor, scales: int = 3) -> list[torch.Tensor]:
    """``[x, x/2, x/4, ...]`` by 2x2 average pooling (``scales`` levels, stopping at 1 pixel)."""
    levels = [x]
    for _ in range(scales - 1):
        if min(levels[-1].shape[-2:]) < 2:
            break
        levels.append(F.avg_pool2d(levels[-1], 2))
    return levels


def pyramid_l1(pred: torch.Tensor, target: torch.Tensor, scales: int = 3) -> torch.Tensor:
    """Mean over pyramid levels of the mean absolute difference."""
    if pred.shape != target.shape:
        raise ValueError(f"pyramid_l1 needs equal shapes, got {tuple(pred.shape)} and {tuple(target.shape)}")
    losses = [F.l1_loss(p, t) for p, t in zip(pyramid(pred.float(), scales), pyramid(target.float(), scales), strict=True)]
    return torch.stack(losses).mean()


def degradation_free_loss(x0_latents: torch.Tensor, hr_latents: torch.Tensor, x0_pixels: torch.Tensor | None = None,
                          hr_pixels: torch.Tensor | None = None, scales: int = 3) -> torch.Tensor:
    """XPSR's degradation-free constraint: latent pyramid L1 plus pixel pyramid L1 (when pixels are given)."""
    loss = pyramid_l1(x0_latents, hr_latents, scales)
    if x0_pixels is not None:
        loss = loss + pyramid_l1(x0_pixels, hr_pixels, scales)
    return loss


def xpsr_dfc_terms(rgb: Sequence[torch.Tensor], latent: Sequence[torch.Tensor], hr_pixels: torch.Tensor,
                   hr_latents: torch.Tensor) -> dict[str, torch.Tensor]:
    """XPSR's DFC terms, unweighted: ``dfc_rgb_i`` (RGB head i vs the HR pixels in [-1, 1]) and ``dfc_latent_i``
    (latent head i vs the scaled HR latents; the mid residual's head is last), each a mean L1 in float32
    against the target bilinearly resized (``align_corners=False``, no antialias, as XPSR) to the head's size."""
    terms = {}
    for prefix, preds, target in (("dfc_rgb", rgb, hr_pixels), ("dfc_latent", latent, hr_latents)):
        target = target.float()
        for i, pred in enumerate(preds):
            resized = F.interpolate(target.to(pred.device), size=pred.shape[-2:], mode="bilinear")
            terms[f"{prefix}_{i}"] = F.l1_loss(pred.float(), resized)
    return terms


def semantic_loss(restored: Sequence[torch.Tensor], targets: Sequence[torch.Tensor],
                  mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over encoders of the (masked) mean cosine distance ``1 - cos(restored, target)`` per sample."""
    terms = []
    for r, t in zip(restored, targets, strict=True):
        dist = 1 - F.cosine_similarity(r.float(), t.float().to(r.device), dim=-1, eps=1e-8)
        if mask is None:
            terms.append(dist.mean())
        else:
            m = mask.to(dist.device, dist.dtype)
            terms.append((dist * m).sum() / m.sum().clamp(min=1))
    if not terms:
        raise ValueError("semantic_loss needs at least one (restored, target) pair")
    return torch.stack(terms).mean()


def wasserstein1_pixels(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Exact 1-D W1 between the value distributions of ``pred`` and ``target`` per (image, channel), averaged.

    For two empirical distributions with the same number of samples, W1 is the mean absolute
    difference of the sorted samples; sorting is differentiable in the values.
    """
    if pred.shape != target.shape:
        raise ValueError(f"wasserstein1_pixels needs equal shapes, got {tuple(pred.shape)} and {tuple(target.shape)}")
    p = pred.float().flatten(2).sort(dim=-1).values
    t = target.float().to(p.device).flatten(2).sort(dim=-1).values
    return (p - t).abs().mean()
