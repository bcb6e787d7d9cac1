"""Preconditioning wrappers: D(x; sigma) = c_skip x + c_out F(c_in x, c_noise).

Karras et al. 2022 (EDM), Eq. 7 and Table 1; DPDM (Dockhorn et al. 2022) §2 / App. for the
v-prediction variant. Every wrapper takes EDM-style noisy inputs x = clean + sigma * n with a
per-row ``sigma`` of shape (N,) and returns the denoised estimate of ``clean``.

The code is pure tensor arithmetic (no ``.item()``, no in-place ops, no branching on tensor
values), so it runs under ``torch.func.vmap`` / ``functional_call`` and under Opacus hooks. The
wrappers hold no parameters of their own; only the backbone is trained.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["Precond", "EDMPrecond", "VPrecond", "VPPrecond", "VEPrecond", "vp_sigma", "vp_sigma_inv"]


def _as_rows(sigma: Tensor | float, x: Tensor) -> Tensor:
    """Return sigma as a (N,) tensor in x's dtype; a scalar is broadcast to all N rows."""
    if not isinstance(sigma, Tensor):
        sigma = torch.full((x.shape[0],), float(sigma), dtype=x.dtype, device=x.device)
    return sigma.to(x.dtype).reshape(-1).expand(x.shape[0])


def vp_sigma(t: Tensor, beta_d: float, beta_min: float) -> Tensor:
    """VP-SDE noise level, EDM Table 1: sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)."""
    return torch.sqrt(torch.expm1(0.5 * beta_d * t**2 + beta_min * t))


def vp_sigma_inv(sigma: Tensor, beta_d: float, beta_min: float) -> Tensor:
    """Inverse of :func:`vp_sigma`: t = (sqrt(beta_min^2 + 2 beta_d ln(sigma^2 + 1)) - beta_min) / beta_d."""
    return (torch.sqrt(beta_min**2 + 2 * beta_d * torch.log1p(sigma**2)) - beta_min) / beta_d


class Precond(nn.Module):
    """Base wrapper. Subclasses implement :meth:`coefficients` (EDM Eq. 7)."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def coefficients(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Return (c_skip, c_out, c_in, c_noise), each of sigma's shape."""
        raise NotImplementedError

    def forward(self, x: Tensor, sigma: Tensor | float, class_labels: Tensor | None = None) -> Tensor:
        sigma = _as_rows(sigma, x)
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        view = (-1,) + (1,) * (x.ndim - 1)
        F_x = self.backbone(c_in.reshape(view) * x, c_noise, class_labels)
        # EDM Eq. 7: D(x; sigma) = c_skip x + c_out F(c_in x; c_noise)
        return c_skip.reshape(view) * x + c_out.reshape(view) * F_x.to(x.dtype)


class EDMPrecond(Precond):
    """EDM preconditioning (Karras et al. 2022, Table 1); DPDM uses sigma_data = sqrt(1/3) for [-1, 1] data."""

    def __init__(self, backbone: nn.Module, sigma_data: float = math.sqrt(1 / 3)):
        super().__init__(backbone)
        self.sigma_data = sigma_data

    def coefficients(self, sigma):
        sd = self.sigma_data
        c_skip = sd**2 / (sigma**2 + sd**2)
        c_out = sigma * sd / torch.sqrt(sigma**2 + sd**2)
        c_in = 1 / torch.sqrt(sigma**2 + sd**2)
        c_noise = torch.log(sigma) / 4
        return c_skip, c_out, c_in, c_noise


class VPrecond(Precond):
    """v-prediction (Salimans & Ho 2022), as used by DPDM: EDM with sigma_data = 1 and c_noise = t.

    With alpha = 1/sqrt(1+sigma^2), s = sigma/sqrt(1+sigma^2) the VP-scaled input is
    z = alpha x_noisy = c_in x_noisy and the network predicts v = alpha n - s x. Then
    x_hat = alpha z - s v = x_noisy / (1 + sigma^2) - sigma/sqrt(1+sigma^2) v, so
    c_out = -sigma/sqrt(1+sigma^2): the minus sign makes F a genuine v-prediction
    (the same sign as k-diffusion's VDenoiser). c_noise = t with sigma = tan(pi t / 2).
    """

    def coefficients(self, sigma):
        c_skip = 1 / (sigma**2 + 1)
        c_out = -sigma / torch.sqrt(1 + sigma**2)
        c_in = 1 / torch.sqrt(1 + sigma**2)
        c_noise = 2 / math.pi * torch.atan(sigma)  # t = 2/pi atan(sigma)
        return c_skip, c_out, c_in, c_noise


class VPPrecond(Precond):
    """VP-SDE / DDPM epsilon-prediction (Song et al. 2021), EDM Table 1.

    c_skip = 1, c_out = -sigma, c_in = 1/sqrt(sigma^2+1), c_noise = (M-1) sigma^{-1}(sigma).
    """

    def __init__(self, backbone: nn.Module, beta_d: float = 19.9, beta_min: float = 0.1, M: int = 1000):
        super().__init__(backbone)
        self.beta_d, self.beta_min, self.M = beta_d, beta_min, M

    def coefficients(self, sigma):
        c_skip = torch.ones_like(sigma)
        c_out = -sigma
        c_in = 1 / torch.sqrt(sigma**2 + 1)
        c_noise = (self.M - 1) * vp_sigma_inv(sigma, self.beta_d, self.beta_min)
        return c_skip, c_out, c_in, c_noise


class VEPrecond(Precond):
    """VE-SDE / NCSN (Song et al. 2021), EDM Table 1: c_skip = 1, c_out = sigma, c_in = 1, c_noise = ln(sigma/2)."""

    def coefficients(self, sigma):
        c_skip = torch.ones_like(sigma)
        c_out = sigma
        c_in = torch.ones_like(sigma)
        c_noise = torch.log(0.5 * sigma)
        return c_skip, c_out, c_in, c_noise
