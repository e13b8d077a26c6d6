"""The VAE's latent space in one place: posteriors, scaling/shift, and the way back to pixels.

SD 1.x/2.x scale latents by ``scaling_factor`` (0.18215); SD3-style VAEs also subtract
``shift_factor``. Every caller goes through these functions, so a VAE with a shift works everywhere.
"""

from __future__ import annotations

import torch


def latent_scale(vae_config) -> tuple[float, float]:
    """``(scaling_factor, shift_factor)`` of a VAE config (shift 0 when the VAE has none)."""
    return float(vae_config.scaling_factor), float(getattr(vae_config, "shift_factor", None) or 0.0)


def scale_latents(vae_config, z: torch.Tensor) -> torch.Tensor:
    """A VAE sample -> the diffusion model's latents."""
    scaling, shift = latent_scale(vae_config)
    return (z - shift) * scaling


def unscale_latents(vae_config, latents: torch.Tensor) -> torch.Tensor:
    """The diffusion model's latents -> what the VAE decoder takes."""
    scaling, shift = latent_scale(vae_config)
    return latents / scaling + shift


@torch.no_grad()
def vae_posterior(vae, images: torch.Tensor) -> torch.Tensor:
    """The VAE's diagonal Gaussian posterior of ``images`` (``[B,3,H,W]`` in [-1, 1]): ``[B, 2C, H/8, W/8]``."""
    weight = next(vae.parameters())  # not vae.device: diffusers walks every submodule for hooks (2 ms a call)
    dist = vae.encode(images.to(weight.device, weight.dtype)).latent_dist
    return torch.cat([dist.mean, dist.logvar], dim=1)


def sample_posterior(vae_config, posterior: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Scaled latents drawn from a stored posterior ``[B, 2C, h, w]`` (mean, logvar) with ``noise``."""
    mean, logvar = posterior.chunk(2, dim=1)
    return scale_latents(vae_config, mean + (0.5 * logvar).exp() * noise)


def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents -> images in [-1, 1] (float, in the VAE's dtype)."""
    return vae.decode(unscale_latents(vae.config, latents).to(vae.dtype)).sample
