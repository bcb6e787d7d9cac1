"""Samplers (pure functions, one signature) and noise schedules, in EDM's sigma form.

Every sampler is

    sample_x(denoiser, latents, sigmas, class_labels=None, guidance_scale=0.0, num_classes=0,
             disable=False, generator=None, **knobs) -> Tensor

with ``denoiser(x, sigma, class_labels)`` a preconditioned model (x = clean + sigma n), ``latents``
~ N(0, I) (scaled by ``sigmas[0]`` here) and ``sigmas`` a decreasing 1-D schedule ending in 0.
DPDM §1.6: deterministic DDIM (default, 50 steps), stochastic DDIM, and EDM Heun with churn.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from tqdm.auto import tqdm

__all__ = [
    "karras_sigmas", "loglinear_sigmas", "cfg_denoise",
    "sample_ddim", "sample_ddim_stochastic", "sample_edm_heun",
    "SAMPLERS", "get_sampler", "generate",
]


# --- schedules ------------------------------------------------------------------------------------
def karras_sigmas(n: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                  device="cpu") -> Tensor:
    """EDM Eq. 5: sigma_i = (sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, then 0."""
    if n < 1:
        raise ValueError(f"number of steps must be >= 1, got {n}")
    ramp = torch.linspace(0, 1, n, dtype=torch.float64) if n > 1 else torch.zeros(1, dtype=torch.float64)
    inv_min, inv_max = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (inv_max + ramp * (inv_min - inv_max)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)]).to(device)


def loglinear_sigmas(n: int, sigma_min: float = 0.002, sigma_max: float = 80.0, device="cpu") -> Tensor:
    """n noise levels evenly spaced in ln sigma from sigma_max down to sigma_min, then 0."""
    if n < 1:
        raise ValueError(f"number of steps must be >= 1, got {n}")
    sigmas = torch.exp(torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64))
    return torch.cat([sigmas, sigmas.new_zeros(1)]).to(device)


# --- shared helpers -------------------------------------------------------------------------------
def cfg_denoise(denoiser, x: Tensor, sigma: float, class_labels: Tensor | None = None,
                guidance_scale: float = 0.0, num_classes: int = 0) -> Tensor:
    """Denoise at one noise level with classifier-free guidance (Ho & Salimans 2022).

    D = D_uncond + (1 + w)(D_cond - D_uncond) = (1 + w) D_cond - w D_uncond, where the
    unconditional pass uses the null label ``num_classes``. With w == 0 or no labels only the
    conditional (or unconditional) pass is run.
    """
    sigma_rows = torch.full((x.shape[0],), float(sigma), dtype=x.dtype, device=x.device)
    if guidance_scale == 0 or class_labels is None:
        return denoiser(x, sigma_rows, class_labels)
    if num_classes <= 0:
        raise ValueError(f"guidance_scale={guidance_scale} needs num_classes > 0 (null label id), got {num_classes}")
    null = torch.full_like(class_labels, num_classes)
    D = denoiser(torch.cat([x, x]), torch.cat([sigma_rows, sigma_rows]), torch.cat([class_labels, null]))
    D_cond, D_uncond = D.chunk(2)
    return (1 + guidance_scale) * D_cond - guidance_scale * D_uncond


def _randn_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    gen_device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=gen_device, dtype=x.dtype).to(x.device)


def _check_sigmas(sigmas: Tensor) -> list[float]:
    s = [float(v) for v in sigmas]
    if sigmas.ndim != 1 or len(s) < 2 or s[-1] != 0 or any(a <= b for a, b in zip(s, s[1:])):
        raise ValueError(f"sigmas must be a strictly decreasing 1-D tensor ending in 0, got {sigmas}")
    return s


# --- samplers -------------------------------------------------------------------------------------
@torch.no_grad()
def sample_ddim(denoiser, latents: Tensor, sigmas: Tensor, class_labels: Tensor | None = None,
                guidance_scale: float = 0.0, num_classes: int = 0, disable: bool = False,
                generator: torch.Generator | None = None) -> Tensor:
    """Deterministic DDIM = Euler on the probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma (EDM §3, Eq. 4 with s=1)."""
    s = _check_sigmas(sigmas)
    x = latents * s[0]
    for i in tqdm(range(len(s) - 1), disable=disable, desc="ddim", leave=False):
        D = cfg_denoise(denoiser, x, s[i], class_labels, guidance_scale, num_classes)
        d = (x - D) / s[i]
        x = x + (s[i + 1] - s[i]) * d  # last step (sigma -> 0) returns D exactly
    return x


@torch.no_grad()
def sample_ddim_stochastic(denoiser, latents: Tensor, sigmas: Tensor, class_labels: Tensor | None = None,
                           guidance_scale: float = 0.0, num_classes: int = 0, disable: bool = False,
                           generator: torch.Generator | None = None, eta: float = 1.0,
                           s_noise: float = 1.0) -> Tensor:
    """Stochastic DDIM (Song et al. 2021a, Eq. 12 with eta) in sigma form.

    Step sigma -> sigma' splits into a deterministic move to sigma_down and fresh noise sigma_up:
    sigma_up = eta sqrt(sigma'^2 (sigma^2 - sigma'^2) / sigma^2), sigma_down = sqrt(sigma'^2 - sigma_up^2),
    x' = D + sigma_down (x - D)/sigma + sigma_up z. eta = 0 is deterministic DDIM; eta = 1 is the
    ancestral (DDPM posterior) step, a discretization of the reverse SDE.
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    s = _check_sigmas(sigmas)
    x = latents * s[0]
    for i in tqdm(range(len(s) - 1), disable=disable, desc="ddim_stochastic", leave=False):
        sigma, sigma_next = s[i], s[i + 1]
        D = cfg_denoise(denoiser, x, sigma, class_labels, guidance_scale, num_classes)
        sigma_up = min(sigma_next, eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
        sigma_down = math.sqrt(sigma_next**2 - sigma_up**2)
        x = D + sigma_down * (x - D) / sigma
        if sigma_up > 0:
            x = x + sigma_up * s_noise * _randn_like(x, generator)
    return x


@torch.no_grad()
def sample_edm_heun(denoiser, latents: Tensor, sigmas: Tensor, class_labels: Tensor | None = None,
                    guidance_scale: float = 0.0, num_classes: int = 0, disable: bool = False,
                    generator: torch.Generator | None = None, s_churn: float = 0.0, s_min: float = 0.0,
                    s_max: float = float("inf"), s_noise: float = 1.0) -> Tensor:
    """EDM Algorithm 2: Heun's 2nd-order method with stochastic churn."""
    s = _check_sigmas(sigmas)
    n = len(s) - 1
    x = latents * s[0]
    for i in tqdm(range(n), disable=disable, desc="edm", leave=False):
        t, t_next = s[i], s[i + 1]
        # Alg. 2 lines 4-6: temporarily raise the noise level to t_hat = t (1 + gamma)
        gamma = min(s_churn / n, math.sqrt(2) - 1) if s_min <= t <= s_max else 0.0
        t_hat = t * (1 + gamma)
        x_hat = x
        if gamma > 0:
            x_hat = x + math.sqrt(t_hat**2 - t**2) * s_noise * _randn_like(x, generator)
        # line 7-8: Euler step
        d = (x_hat - cfg_denoise(denoiser, x_hat, t_hat, class_labels, guidance_scale, num_classes)) / t_hat
        x = x_hat + (t_next - t_hat) * d
        # lines 9-11: 2nd-order correction unless the next level is 0
        if t_next > 0:
            d_next = (x - cfg_denoise(denoiser, x, t_next, class_labels, guidance_scale, num_classes)) / t_next
            x = x_hat + (t_next - t_hat) * (0.5 * d + 0.5 * d_next)
    return x


SAMPLERS = {"ddim": sample_ddim, "ddim_stochastic": sample_ddim_stochastic, "edm": sample_edm_heun}


def get_sampler(name: str):
    """Look up a sampler function by name: ``ddim``, ``ddim_stochastic`` or ``edm``."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}")
    return SAMPLERS[name]


@torch.no_grad()
def generate(denoiser, num_samples: int, image_shape: tuple[int, ...], batch_size: int, sampler: str = "ddim",
             num_steps: int = 50, class_labels: Tensor | None = None, device="cpu", seed: int = 0, *,
             sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0, disable: bool = False,
             **knobs) -> tuple[Tensor, Tensor | None]:
    """Draw ``num_samples`` images in batches; returns (images (N, C, H, W) clamped to [-1, 1], labels).

    Schedule: :func:`karras_sigmas` (num_steps, sigma_min, sigma_max, rho); a trained method passes its
    loss's ``sampling_sigma_range()`` (the defaults are EDM's sampling range). ``knobs`` go to the
    sampler (``guidance_scale``, ``num_classes``, ``eta``, ``s_churn`` ...). Labels: ``class_labels``
    if given (shape (N,)); else, if ``num_classes > 0`` in knobs, balanced labels ``arange(N) % num_classes``;
    else None (unconditional). One generator seeded with ``seed`` drives latents and sampler noise.
    """
    sample_fn = get_sampler(sampler)
    if batch_size < 1 or num_samples < 0:
        raise ValueError(f"need batch_size >= 1 and num_samples >= 0, got {batch_size}, {num_samples}")
    num_classes = knobs.get("num_classes", 0)
    labels = class_labels
    if labels is None and num_classes > 0:
        labels = torch.arange(num_samples) % num_classes
    if labels is not None:
        labels = torch.as_tensor(labels, dtype=torch.long, device=device)
        if labels.shape != (num_samples,):
            raise ValueError(f"class_labels must have shape ({num_samples},), got {tuple(labels.shape)}")
    sigmas = karras_sigmas(num_steps, sigma_min, sigma_max, rho, device=device)
    generator = torch.Generator(device).manual_seed(seed)
    out = []
    for start in tqdm(range(0, num_samples, batch_size), disable=disable, desc="generate"):
        n = min(batch_size, num_samples - start)
        latents = torch.randn((n, *image_shape), generator=generator, device=device)
        y = None if labels is None else labels[start:start + n]
        out.append(sample_fn(denoiser, latents, sigmas, y, disable=True, generator=generator, **knobs))
    images = torch.cat(out) if out else torch.empty((0, *image_shape), device=device)
    return images.clamp(-1, 1), labels
