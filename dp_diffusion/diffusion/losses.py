"""Denoising score-matching losses, one class per parameterization (DPDM §2, Eq. 3; Table "1.2").

    loss_i = E_{sigma ~ p(sigma), n ~ N(0, I)} lambda(sigma) ||D(x_i + sigma n, sigma) - x_i||^2

DP-SGD friendly by construction:

* all randomness lives in :meth:`DiffusionLoss.draw`; ``__call__`` is a deterministic function of
  (denoiser, images, labels, draw), so per-example gradients can be taken with
  ``torch.func.vmap(torch.func.grad(...))`` over examples;
* ``__call__`` returns one loss per EXAMPLE, shape (B,), already averaged over the K noise draws
  of that example (noise multiplicity, DPDM Eq. 7). Clipping must happen on the gradient of this
  K-average, never on the K rows separately (that would make the sensitivity K*C).

Training sigma can be restricted to [sigma_lo, sigma_hi] (for staged training). The restricted
distribution is sampled exactly by inverse-CDF (truncation), never by rejection.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .precond import EDMPrecond, VEPrecond, VPPrecond, VPrecond, vp_sigma, vp_sigma_inv

__all__ = ["DiffusionLoss", "EDMLoss", "VLoss", "VPLoss", "VELoss", "LOSSES", "build_loss"]


def _uniform(shape, low, high, generator: torch.Generator | None, device) -> Tensor:
    """U[low, high) in float64 on ``device`` (drawn on the generator's device, then moved)."""
    gen_device = generator.device if generator is not None else device
    u = torch.rand(shape, generator=generator, device=gen_device, dtype=torch.float64).to(device)
    return low + (high - low) * u


def _truncated_std_normal(shape, a: float, b: float, generator, device) -> Tensor:
    """Exact sample of N(0, 1) truncated to [a, b] by inverse CDF: z = Phi^-1(U[Phi(a), Phi(b)]).

    When the interval lies in the right tail we sample the mirrored interval [-b, -a] and negate,
    so that Phi is evaluated where it has full relative precision.
    """
    if a > 0:
        return -_truncated_std_normal(shape, -b, -a, generator, device)
    lo = torch.special.ndtr(torch.tensor(a, dtype=torch.float64))
    hi = torch.special.ndtr(torch.tensor(b, dtype=torch.float64))
    u = _uniform(shape, lo.to(device), hi.to(device), generator, device)
    # guard the open ends: Phi^-1(0) = -inf
    tiny = torch.finfo(torch.float64).tiny
    return torch.special.ndtri(u.clamp(min=tiny, max=1 - 1e-16))


class DiffusionLoss:
    """Base class. Subclasses define ``precond_cls``, :meth:`sample_sigma`, :meth:`weight`, :meth:`sigma_range`.

    Args:
        label_dropout: probability of replacing a label by the null id ``num_classes``
            (classifier-free guidance training; DPDM uses 0.1).
        num_classes: number of real classes; the null class id is ``num_classes``.
        sigma_lo, sigma_hi: optional restriction of the training noise levels (truncation).
    """

    precond_cls: type[nn.Module] = EDMPrecond
    # The sampler's noise range (EDM Table 1, "sampling": sigma in [0.002, 80], the Karras schedule's ends).
    # DPDM samples every parameterization (EDM, v, VP, VE) over this range, so every loss here reports it;
    # a parameterization that samples elsewhere (e.g. a latent space) overrides these two.
    sampling_sigma_min: float = 0.002
    sampling_sigma_max: float = 80.0

    def __init__(self, label_dropout: float = 0.0, num_classes: int = 0,
                 sigma_lo: float | None = None, sigma_hi: float | None = None):
        if not 0.0 <= label_dropout < 1.0:
            raise ValueError(f"label_dropout must be in [0, 1), got {label_dropout}")
        if label_dropout > 0 and num_classes <= 0:
            raise ValueError(f"label_dropout={label_dropout} > 0 needs num_classes > 0 (null id = num_classes), "
                             f"got num_classes={num_classes}")
        if sigma_lo is not None and sigma_lo <= 0:
            raise ValueError(f"sigma_lo must be > 0, got {sigma_lo}")
        if sigma_lo is not None and sigma_hi is not None and sigma_lo >= sigma_hi:
            raise ValueError(f"sigma_lo must be < sigma_hi, got sigma_lo={sigma_lo}, sigma_hi={sigma_hi}")
        self.label_dropout = label_dropout
        self.num_classes = num_classes
        self.sigma_lo = sigma_lo
        self.sigma_hi = sigma_hi

    # --- per-parameterization pieces -------------------------------------------------------------
    def sample_sigma(self, shape, generator: torch.Generator | None = None, device="cpu") -> Tensor:
        """Draw sigma ~ p(sigma), restricted to [sigma_lo, sigma_hi] if set; float64."""
        raise NotImplementedError

    def weight(self, sigma: Tensor) -> Tensor:
        """lambda(sigma)."""
        raise NotImplementedError

    def sigma_range(self) -> tuple[float, float]:
        """(sigma_min, sigma_max) default for samplers; the training range when restricted."""
        raise NotImplementedError

    def sampling_sigma_range(self) -> tuple[float, float]:
        """(sigma_min, sigma_max) of the sampler's schedule: the ends of the noise levels a sample passes
        through. Independent of a training restriction (sigma_lo, sigma_hi): a stage model trained on part
        of the range is sampled inside a sampler that spans all of it."""
        return self.sampling_sigma_min, self.sampling_sigma_max

    def precondition(self, backbone: nn.Module) -> nn.Module:
        """Wrap a raw backbone in this parameterization's preconditioner."""
        return self.precond_cls(backbone)

    # --- shared ----------------------------------------------------------------------------------
    def _clip_range(self, lo: float, hi: float) -> tuple[float, float]:
        """Intersect a native sigma range [lo, hi] with [sigma_lo, sigma_hi]."""
        lo = lo if self.sigma_lo is None else max(lo, self.sigma_lo)
        hi = hi if self.sigma_hi is None else min(hi, self.sigma_hi)
        if not lo < hi:
            raise ValueError(f"{type(self).__name__}: [sigma_lo, sigma_hi] = [{self.sigma_lo}, {self.sigma_hi}] "
                             f"does not intersect the parameterization's range; got empty [{lo}, {hi}]")
        return lo, hi

    def draw(self, images: Tensor, labels: Tensor | None, noise_multiplicity: int = 1,
             generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """All randomness of one loss evaluation, leading dim B (examples), K = noise_multiplicity.

        Returns {'sigma': (B, K), 'noise': (B, K, C, H, W) ~ N(0, I), 'keep_label': (B, K) bool}.
        """
        if noise_multiplicity < 1:
            raise ValueError(f"noise_multiplicity must be >= 1, got {noise_multiplicity}")
        B, K, device = images.shape[0], noise_multiplicity, images.device
        gen_device = generator.device if generator is not None else device
        sigma = self.sample_sigma((B, K), generator=generator, device=device).to(images.dtype)
        noise = torch.randn((B, K, *images.shape[1:]), generator=generator, device=gen_device,
                            dtype=images.dtype).to(device)
        keep = _uniform((B, K), 0.0, 1.0, generator, device) >= self.label_dropout
        return {"sigma": sigma, "noise": noise, "keep_label": keep}

    def __call__(self, denoiser, images: Tensor, labels: Tensor | None, draw: dict[str, Tensor]) -> Tensor:
        """Per-example loss (B,): DPDM Eq. 7, l_i = 1/K sum_k lambda(sigma_ik) ||D(x_i + sigma_ik n_ik) - x_i||^2.

        Squared error is averaged over pixels. Each example is repeated K times contiguously and the
        B*K rows go through ONE forward pass (as in the DPDM reference implementation).
        """
        sigma, noise = draw["sigma"], draw["noise"]
        B, K = sigma.shape
        x = images.unsqueeze(1).expand(B, K, *images.shape[1:]).reshape(B * K, *images.shape[1:])
        sigma = sigma.reshape(B * K)
        n = noise.reshape(B * K, *images.shape[1:])
        y = None
        if labels is not None:
            y = labels.unsqueeze(1).expand(B, K).reshape(B * K)
            keep = draw["keep_label"].reshape(B * K)
            y = torch.where(keep, y, torch.full_like(y, self.num_classes))  # null class for CFG
        view = (-1,) + (1,) * (x.ndim - 1)
        D = denoiser(x + sigma.reshape(view) * n, sigma, y)
        per_row = self.weight(sigma) * ((D - x) ** 2).flatten(1).mean(1)  # DPDM Eq. 3
        return per_row.reshape(B, K).mean(1)  # DPDM Eq. 7: average over the K draws


class EDMLoss(DiffusionLoss):
    """EDM (Karras et al. 2022): ln sigma ~ N(P_mean, P_std^2), lambda = (sigma^2 + sd^2) / (sigma sd)^2."""

    precond_cls = EDMPrecond

    def __init__(self, P_mean: float = -1.2, P_std: float = 1.2, sigma_data: float = math.sqrt(1 / 3),
                 label_dropout: float = 0.0, num_classes: int = 0,
                 sigma_lo: float | None = None, sigma_hi: float | None = None):
        super().__init__(label_dropout, num_classes, sigma_lo, sigma_hi)
        self.P_mean, self.P_std, self.sigma_data = P_mean, P_std, sigma_data

    def sample_sigma(self, shape, generator=None, device="cpu"):
        if self.sigma_lo is None and self.sigma_hi is None:
            gen_device = generator.device if generator is not None else device
            z = torch.randn(shape, generator=generator, device=gen_device, dtype=torch.float64).to(device)
        else:  # truncated normal for ln sigma, by inverse CDF
            a = -math.inf if self.sigma_lo is None else (math.log(self.sigma_lo) - self.P_mean) / self.P_std
            b = math.inf if self.sigma_hi is None else (math.log(self.sigma_hi) - self.P_mean) / self.P_std
            z = _truncated_std_normal(shape, a, b, generator, device)
        return torch.exp(self.P_mean + self.P_std * z)

    def weight(self, sigma):
        sd = self.sigma_data
        return (sigma**2 + sd**2) / (sigma * sd) ** 2

    def sigma_range(self):
        return (0.002 if self.sigma_lo is None else self.sigma_lo, 80.0 if self.sigma_hi is None else self.sigma_hi)

    def precondition(self, backbone):
        return EDMPrecond(backbone, sigma_data=self.sigma_data)


class VLoss(DiffusionLoss):
    """v-prediction (DPDM): t ~ U[t(logsnr_max), t(logsnr_min)], sigma = tan(pi t / 2), lambda = (sigma^2 + 1) / sigma^2.

    logSNR = -2 ln sigma, so t(logsnr) = 2/pi atan(exp(-logsnr / 2)).
    """

    precond_cls = VPrecond

    def __init__(self, logsnr_min: float = -9.0, logsnr_max: float = 13.0,
                 label_dropout: float = 0.0, num_classes: int = 0,
                 sigma_lo: float | None = None, sigma_hi: float | None = None):
        super().__init__(label_dropout, num_classes, sigma_lo, sigma_hi)
        self.logsnr_min, self.logsnr_max = logsnr_min, logsnr_max

    @staticmethod
    def _t(sigma: float) -> float:
        return 2 / math.pi * math.atan(sigma)

    def sigma_range(self):
        return self._clip_range(math.exp(-self.logsnr_max / 2), math.exp(-self.logsnr_min / 2))

    def sample_sigma(self, shape, generator=None, device="cpu"):
        lo, hi = self.sigma_range()  # t is monotone in sigma: restricting t = truncating p(sigma)
        t = _uniform(shape, self._t(lo), self._t(hi), generator, device)
        return torch.tan(math.pi * t / 2)

    def weight(self, sigma):
        return (sigma**2 + 1) / sigma**2


class VPLoss(DiffusionLoss):
    """VP-SDE (Song et al. 2021; EDM Table 1): t ~ U[epsilon_t, 1], sigma = sigma_VP(t), lambda = 1 / sigma^2."""

    precond_cls = VPPrecond

    def __init__(self, beta_d: float = 19.9, beta_min: float = 0.1, epsilon_t: float = 1e-5,
                 label_dropout: float = 0.0, num_classes: int = 0,
                 sigma_lo: float | None = None, sigma_hi: float | None = None):
        super().__init__(label_dropout, num_classes, sigma_lo, sigma_hi)
        self.beta_d, self.beta_min, self.epsilon_t = beta_d, beta_min, epsilon_t

    def _sigma(self, t: float) -> float:
        return float(vp_sigma(torch.tensor(t, dtype=torch.float64), self.beta_d, self.beta_min))

    def _t(self, sigma: float) -> float:
        return float(vp_sigma_inv(torch.tensor(sigma, dtype=torch.float64), self.beta_d, self.beta_min))

    def sigma_range(self):
        return self._clip_range(self._sigma(self.epsilon_t), self._sigma(1.0))

    def sample_sigma(self, shape, generator=None, device="cpu"):
        lo, hi = self.sigma_range()
        t_lo = self.epsilon_t if self.sigma_lo is None else self._t(lo)
        t_hi = 1.0 if self.sigma_hi is None else self._t(hi)
        t = _uniform(shape, t_lo, t_hi, generator, device)
        return vp_sigma(t, self.beta_d, self.beta_min)

    def weight(self, sigma):
        return 1 / sigma**2

    def precondition(self, backbone):
        return VPPrecond(backbone, beta_d=self.beta_d, beta_min=self.beta_min)


class VELoss(DiffusionLoss):
    """VE-SDE (Song et al. 2021; EDM Table 1): ln sigma ~ U[ln sigma_min, ln sigma_max], lambda = 1 / sigma^2."""

    precond_cls = VEPrecond

    def __init__(self, sigma_min: float = 0.02, sigma_max: float = 100.0,
                 label_dropout: float = 0.0, num_classes: int = 0,
                 sigma_lo: float | None = None, sigma_hi: float | None = None):
        super().__init__(label_dropout, num_classes, sigma_lo, sigma_hi)
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def sigma_range(self):
        return self._clip_range(self.sigma_min, self.sigma_max)

    def sample_sigma(self, shape, generator=None, device="cpu"):
        lo, hi = self.sigma_range()
        return torch.exp(_uniform(shape, math.log(lo), math.log(hi), generator, device))

    def weight(self, sigma):
        return 1 / sigma**2


LOSSES: dict[str, type[DiffusionLoss]] = {"edm": EDMLoss, "v": VLoss, "vp": VPLoss, "ve": VELoss}


def build_loss(name: str, **kwargs) -> DiffusionLoss:
    """Build a loss by name: one of ``edm``, ``v``, ``vp``, ``ve``."""
    if name not in LOSSES:
        raise ValueError(f"unknown diffusion loss {name!r}; choose one of {sorted(LOSSES)}")
    return LOSSES[name](**kwargs)
