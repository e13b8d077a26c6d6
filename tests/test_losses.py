"""Each loss of training/losses.py against an independent computation: diffusers' scheduler maths,
numpy, numbers worked by hand (XPSR's DFC terms), scipy.stats.wasserstein_distance."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from scipy.stats import wasserstein_distance

from spasem.profiles.real_size import load_spec
from training import losses


def scheduler(prediction_type: str) -> DDPMScheduler:
    return DDPMScheduler.from_config({**load_spec("sd15-scheduler")["config"], "prediction_type": prediction_type})


def tensors(seed: int = 0, shape=(3, 4, 8, 8)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g), torch.tensor([0, 499, 999])


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_diffusion_target_matches_the_scheduler(prediction_type):
    sched = scheduler(prediction_type)
    latents, noise, t = tensors()
    target = losses.diffusion_target(latents, noise, t, sched.alphas_cumprod, prediction_type)
    expected = noise if prediction_type == "epsilon" else sched.get_velocity(latents, noise, t)
    torch.testing.assert_close(target, expected, rtol=1e-5, atol=1e-6)
    pred = target + 0.1
    torch.testing.assert_close(losses.diffusion_loss(pred, target), torch.tensor(0.01), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_predicted_x0_matches_ddpm_pred_original_sample(prediction_type):
    sched = scheduler(prediction_type)
    latents, noise, t = tensors(1)
    noisy = sched.add_noise(latents, noise, t)
    pred = losses.diffusion_target(latents, noise, t, sched.alphas_cumprod, prediction_type)
    x0 = losses.predicted_x0(noisy, pred, t, sched.alphas_cumprod, prediction_type)
    # a perfect prediction recovers the clean latents
    torch.testing.assert_close(x0, latents, rtol=1e-3, atol=2e-3)
    for i, step in enumerate(t.tolist()):
        ref = sched.step(pred[i : i + 1] + 0.3, step, noisy[i : i + 1]).pred_original_sample
        ours = losses.predicted_x0(noisy[i : i + 1], pred[i : i + 1] + 0.3, t[i : i + 1], sched.alphas_cumprod,
                                   prediction_type)
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def _numpy_pyramid_l1(a: np.ndarray, b: np.ndarray, scales: int) -> float:
    total = []
    for _ in range(scales):
        total.append(np.abs(a - b).mean())
        n, c, h, w = a.shape
        a = a.reshape(n, c, h // 2, 2, w // 2, 2).mean(axis=(3, 5))
        b = b.reshape(n, c, h // 2, 2, w // 2, 2).mean(axis=(3, 5))
    return float(np.mean(total))


def test_degradation_free_constraint_is_l1_over_three_scale_pyramids():
    g = torch.Generator().manual_seed(2)
    x0, z = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 4, 16, 16, generator=g)
    pix, hr = torch.rand(2, 3, 32, 32, generator=g), torch.rand(2, 3, 32, 32, generator=g)
    assert [p.shape[-1] for p in losses.pyramid(pix)] == [32, 16, 8]
    lat = _numpy_pyramid_l1(x0.numpy(), z.numpy(), 3)
    px = _numpy_pyramid_l1(pix.numpy(), hr.numpy(), 3)
    assert losses.pyramid_l1(x0, z, 3).item() == pytest.approx(lat, rel=1e-5)
    assert losses.degradation_free_loss(x0, z, scales=3).item() == pytest.approx(lat, rel=1e-5)
    assert losses.degradation_free_loss(x0, z, pix, hr, scales=3).item() == pytest.approx(lat + px, rel=1e-5)
    assert losses.pyramid_l1(hr, hr).item() == 0.0
    with pytest.raises(ValueError, match="equal shapes"):
        losses.pyramid_l1(x0, pix)


def test_xpsr_dfc_terms_match_a_hand_computation():
    # HR pixels: channel c is [[1, 2], [3, 4]] * c; XPSR resizes the target bilinearly to each head's size
    hr = torch.tensor([[1.0, 2.0], [3.0, 4.0]]) * torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1)
    rgb = [torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 2, 2)]
    # 1x1: the target is the 2x2 mean (bilinear, align_corners=False, halves = 2x2 average), 2.5 c
    rgb_0 = (2.5 * 1 + 2.5 * 2 + 2.5 * 3) / 3
    # 2x2: the target as is; |1 - v| over the 12 values 1..4, 2..8, 3..12
    rgb_1 = sum(abs(1 - v * c) for c in (1, 2, 3) for v in (1, 2, 3, 4)) / 12
    latents = torch.arange(4 * 4 * 4, dtype=torch.float32).view(1, 4, 4, 4)
    lat = [latents + 0.5, torch.zeros(1, 4, 2, 2)]
    # same size: every value off by 0.5; half size: 2x2 means of each channel's 4x4 ramp, mean of those
    lat_1 = np.abs(latents.numpy().reshape(1, 4, 2, 2, 2, 2).mean(axis=(3, 5))).mean()
    terms = losses.xpsr_dfc_terms(rgb, lat, hr, latents)
    assert list(terms) == ["dfc_rgb_0", "dfc_rgb_1", "dfc_latent_0", "dfc_latent_1"]
    expected = [rgb_0, rgb_1, 0.5, lat_1]
    assert [t.item() for t in terms.values()] == pytest.approx(expected, rel=1e-6)
    assert rgb_0 == 5.0 and lat_1 == pytest.approx(31.5)  # the numbers worked by hand
    # gradients reach the heads' predictions, never the targets
    pred = torch.zeros(1, 3, 1, 1, requires_grad=True)
    losses.xpsr_dfc_terms([pred], [], hr, latents)["dfc_rgb_0"].backward()
    torch.testing.assert_close(pred.grad, torch.full((1, 3, 1, 1), -1 / 3))


def test_semantic_constraint_is_masked_cosine_distance():
    g = torch.Generator().manual_seed(3)
    restored = [torch.randn(4, 48, generator=g), torch.randn(4, 40, generator=g)]
    targets = [torch.randn(4, 48, generator=g), torch.randn(4, 40, generator=g)]
    mask = torch.tensor([True, False, True, True])

    def cos_dist(a, b):
        a, b = a.numpy(), b.numpy()
        return 1 - (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))

    m = mask.numpy()
    expected = np.mean([cos_dist(r, t)[m].mean() for r, t in zip(restored, targets, strict=True)])
    assert losses.semantic_loss(restored, targets, mask).item() == pytest.approx(expected, rel=1e-5)
    unmasked = np.mean([cos_dist(r, t).mean() for r, t in zip(restored, targets, strict=True)])
    assert losses.semantic_loss(restored, targets).item() == pytest.approx(unmasked, rel=1e-5)
    # same direction, any length: no loss
    assert losses.semantic_loss([targets[0] * 3], [targets[0]]).item() == pytest.approx(0, abs=1e-6)


def test_wasserstein1_matches_scipy_per_image_and_channel():
    g = torch.Generator().manual_seed(4)
    pred = torch.rand(2, 3, 12, 10, generator=g) * 2 - 1
    target = torch.randn(2, 3, 12, 10, generator=g).clamp(-1, 1)
    expected = np.mean([wasserstein_distance(pred[b, c].flatten().numpy(), target[b, c].flatten().numpy())
                        for b in range(2) for c in range(3)])
    assert losses.wasserstein1_pixels(pred, target).item() == pytest.approx(expected, rel=1e-5)
    # a distribution, not a pixel-wise loss: shuffling the pixels of an image changes nothing
    shuffled = target.flatten(2)[..., torch.randperm(120, generator=g)].view_as(target)
    assert losses.wasserstein1_pixels(shuffled, target).item() == pytest.approx(0.0, abs=1e-7)
    pred.requires_grad_(True)
    losses.wasserstein1_pixels(pred, target).backward()
    assert torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0
