"""Noise-level stages: training a model on one sigma range, and sampling with one model per range.

DP-SynGen (Choi et al., arXiv 2412.09842) splits the noise levels into three stages, named as in
"perception prioritized training" (Choi et al. 2022):

    coarse    sigma >  tau_coarse                   highest noise   (synthetic images, no privacy cost)
    context   tau_cleaning <= sigma <= tau_coarse   middle          (private data, DP-SGD)
    cleaning  sigma <  tau_cleaning                 lowest noise    (synthetic images, no privacy cost)

The boundaries are given in ln sigma (the official configs' ``loss.log_tau``: 2 and -3, i.e.
sigma = e^2 ~ 7.39 and e^-3 ~ 0.0498). A sigma exactly at a boundary belongs to the CONTEXT stage
(its range is closed); the comparison is made in the sigma tensor's own dtype. Either boundary may be
None: that stage is then absent and the context stage extends to 0 (no cleaning stage) or to infinity
(no coarse stage), which gives DP-SynGen's single-synthetic-stage variants.

Pieces (samplers stay unchanged; they only see a denoiser):

* :class:`StageRanges`: the boundaries and the per-row stage assignment;
* :func:`restrict_loss`: a loss whose training sigma is its distribution TRUNCATED to a range
  (exact inverse-CDF sampling by the losses themselves, never rejection);
* :func:`sigma_cdf` / :func:`sigma_mass`: the CDF of a loss's training sigma distribution;
* :class:`UnionSigmaLoss`: training sigma restricted to a union of disjoint ranges, sampled exactly
  as the mixture of the truncated pieces weighted by their probability masses;
* :class:`SwitchingDenoiser`: one denoiser that routes every row to the model owning its sigma.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .losses import DiffusionLoss, EDMLoss, VELoss, VLoss, VPLoss
from .precond import vp_sigma_inv

__all__ = [
    "STAGES", "StageRanges", "restrict_loss", "sigma_cdf", "sigma_mass", "UnionSigmaLoss", "SwitchingDenoiser",
]

STAGES = ("cleaning", "context", "coarse")  # by increasing sigma; StageRanges.assign returns these indices

Bound = float | None  # None: unbounded on that side
SigmaInterval = tuple[Bound, Bound]


@dataclass(frozen=True)
class StageRanges:
    """Stage boundaries in ln sigma; None removes that stage (see the module docstring)."""

    log_tau_coarse: float | None = 2.0
    log_tau_cleaning: float | None = -3.0

    def __post_init__(self) -> None:
        lo, hi = self.log_tau_cleaning, self.log_tau_coarse
        if lo is not None and hi is not None and not lo < hi:
            raise ValueError(
                f"log_tau_cleaning must be < log_tau_coarse (the context stage lies between them), "
                f"got log_tau_cleaning={lo}, log_tau_coarse={hi}"
            )

    @property
    def tau_coarse(self) -> float | None:
        return None if self.log_tau_coarse is None else math.exp(self.log_tau_coarse)

    @property
    def tau_cleaning(self) -> float | None:
        return None if self.log_tau_cleaning is None else math.exp(self.log_tau_cleaning)

    def present(self) -> tuple[str, ...]:
        """The stages that exist, by increasing sigma."""
        return tuple(s for s in STAGES if s == "context" or self.bounds(s) != (None, None))

    def bounds(self, stage: str) -> SigmaInterval:
        """(lo, hi) of a stage's sigma range; (None, None) for an absent synthetic stage."""
        if stage == "context":
            return self.tau_cleaning, self.tau_coarse
        if stage == "coarse":
            return (self.tau_coarse, None) if self.tau_coarse is not None else (None, None)
        if stage == "cleaning":
            return (None, self.tau_cleaning) if self.tau_cleaning is not None else (None, None)
        raise ValueError(f"unknown stage {stage!r}; stages are {STAGES}")

    def describe(self, stage: str) -> str:
        """Human-readable range, e.g. 'sigma > e^2 = 7.389'."""
        if stage == "coarse":
            return f"sigma > e^{self.log_tau_coarse:g} = {self.tau_coarse:.4g}"
        if stage == "cleaning":
            return f"sigma < e^{self.log_tau_cleaning:g} = {self.tau_cleaning:.4g}"
        lo = "0 <" if self.tau_cleaning is None else f"e^{self.log_tau_cleaning:g} = {self.tau_cleaning:.4g} <="
        hi = "< inf" if self.tau_coarse is None else f"<= e^{self.log_tau_coarse:g} = {self.tau_coarse:.4g}"
        return f"{lo} sigma {hi}"

    def assign(self, sigma: Tensor) -> Tensor:
        """Stage index per element (0 cleaning, 1 context, 2 coarse; see STAGES); boundaries go to context."""
        index = torch.ones(sigma.shape, dtype=torch.long, device=sigma.device)
        if self.tau_coarse is not None:
            index = index + (sigma > torch.tensor(self.tau_coarse, dtype=sigma.dtype, device=sigma.device)).long()
        if self.tau_cleaning is not None:
            index = index - (sigma < torch.tensor(self.tau_cleaning, dtype=sigma.dtype, device=sigma.device)).long()
        return index


# --- training noise restricted to ranges -----------------------------------------------------------
def restrict_loss(loss: DiffusionLoss, lo: Bound, hi: Bound) -> DiffusionLoss:
    """A copy of ``loss`` whose training sigma is p(sigma) truncated to [lo, hi] (None: open side).

    Intersected with any restriction ``loss`` already has. Sampling stays the loss's own exact
    inverse-CDF truncation (``sigma_lo`` / ``sigma_hi``).
    """
    out = copy.copy(loss)
    if lo is not None:
        out.sigma_lo = lo if loss.sigma_lo is None else max(lo, loss.sigma_lo)
    if hi is not None:
        out.sigma_hi = hi if loss.sigma_hi is None else min(hi, loss.sigma_hi)
    if out.sigma_lo is not None and out.sigma_hi is not None and not out.sigma_lo < out.sigma_hi:
        raise ValueError(f"restricting {type(loss).__name__} to [{lo}, {hi}] leaves an empty sigma range "
                         f"[{out.sigma_lo}, {out.sigma_hi}]")
    out.sigma_range()  # raises for an empty intersection with a bounded parameterization
    return out


def _edm_cdf(loss: EDMLoss, sigma: Tensor) -> Tensor:
    # ln sigma ~ N(P_mean, P_std^2)
    return torch.special.ndtr((torch.log(sigma) - loss.P_mean) / loss.P_std)


def _uniform_cdf(transform: Callable[[Tensor], Tensor], lo: float, hi: float, sigma: Tensor) -> Tensor:
    """CDF of sigma = transform^-1(U[transform(lo), transform(hi)]) for a monotone ``transform``."""
    t = transform(sigma.clamp(lo, hi))
    t_lo, t_hi = transform(sigma.new_tensor(lo)), transform(sigma.new_tensor(hi))
    return (t - t_lo) / (t_hi - t_lo)


def _v_cdf(loss: VLoss, sigma: Tensor) -> Tensor:
    # t = 2/pi atan(sigma) ~ U over the logSNR range
    lo, hi = math.exp(-loss.logsnr_max / 2), math.exp(-loss.logsnr_min / 2)
    return _uniform_cdf(torch.atan, lo, hi, sigma)


def _vp_cdf(loss: VPLoss, sigma: Tensor) -> Tensor:
    # t ~ U[epsilon_t, 1], sigma = sigma_VP(t)
    def t_of(s: Tensor) -> Tensor:
        return vp_sigma_inv(s, loss.beta_d, loss.beta_min)

    t = t_of(sigma).clamp(loss.epsilon_t, 1.0)
    return (t - loss.epsilon_t) / (1.0 - loss.epsilon_t)


def _ve_cdf(loss: VELoss, sigma: Tensor) -> Tensor:
    # ln sigma ~ U[ln sigma_min, ln sigma_max]
    return _uniform_cdf(torch.log, loss.sigma_min, loss.sigma_max, sigma)


# CDF of each parameterization's UNRESTRICTED training sigma; register new losses here.
BASE_SIGMA_CDFS: dict[type[DiffusionLoss], Callable[[DiffusionLoss, Tensor], Tensor]] = {
    EDMLoss: _edm_cdf, VLoss: _v_cdf, VPLoss: _vp_cdf, VELoss: _ve_cdf,
}


def _base_cdf(loss: DiffusionLoss, sigma: Tensor) -> Tensor:
    for cls in type(loss).__mro__:
        if cls in BASE_SIGMA_CDFS:
            return BASE_SIGMA_CDFS[cls](loss, sigma)
    raise TypeError(f"no sigma CDF registered for {type(loss).__name__}; add it to BASE_SIGMA_CDFS")


def sigma_cdf(loss: DiffusionLoss, sigma: Tensor | float) -> Tensor:
    """P(sigma' <= sigma) for sigma' drawn by ``loss.sample_sigma`` (including its own restriction), float64."""
    s = torch.as_tensor(sigma, dtype=torch.float64).clamp(min=torch.finfo(torch.float64).tiny)
    if loss.sigma_lo is None and loss.sigma_hi is None:
        return _base_cdf(loss, s).clamp(0, 1)
    lo = 0.0 if loss.sigma_lo is None else loss.sigma_lo
    hi = math.inf if loss.sigma_hi is None else loss.sigma_hi
    base = copy.copy(loss)
    base.sigma_lo = base.sigma_hi = None
    f_lo, f_hi = (_base_cdf(base, s.new_tensor(v).clamp(min=torch.finfo(torch.float64).tiny)) for v in (lo, hi))
    return ((_base_cdf(base, s.clamp(lo, hi)) - f_lo) / (f_hi - f_lo)).clamp(0, 1)


def sigma_mass(loss: DiffusionLoss, lo: Bound, hi: Bound) -> float:
    """P(lo <= sigma <= hi) under ``loss``'s training distribution."""
    f_hi = 1.0 if hi is None else float(sigma_cdf(loss, hi))
    f_lo = 0.0 if lo is None else float(sigma_cdf(loss, lo))
    return max(0.0, f_hi - f_lo)


class UnionSigmaLoss(DiffusionLoss):
    """``base`` with its training sigma restricted to a union of disjoint ranges.

    p(sigma | union) = sum_j w_j p(sigma | range_j) with w_j = P(range_j) / sum_k P(range_k): each draw
    picks a range with probability w_j, then samples ``base`` truncated to it (exact, no rejection).
    Weights, preconditioning and labels are those of ``base``.
    """

    def __init__(self, base: DiffusionLoss, ranges: Sequence[SigmaInterval]):
        super().__init__(label_dropout=base.label_dropout, num_classes=base.num_classes)
        if not ranges:
            raise ValueError("UnionSigmaLoss needs at least one sigma range")
        ordered = sorted(ranges, key=lambda r: -math.inf if r[0] is None else r[0])
        for (_, hi), (lo, _) in zip(ordered, ordered[1:]):
            if hi is None or lo is None or hi > lo:
                raise ValueError(f"UnionSigmaLoss ranges must be disjoint, got {list(ranges)}")
        self.base = base
        self.pieces = [restrict_loss(base, lo, hi) for lo, hi in ordered]
        masses = [sigma_mass(base, lo, hi) for lo, hi in ordered]
        total = sum(masses)
        if not total > 0:
            raise ValueError(f"the sigma ranges {list(ranges)} have zero probability under {type(base).__name__}")
        self.weights = [m / total for m in masses]
        self.precond_cls = base.precond_cls

    def sample_sigma(self, shape, generator: torch.Generator | None = None, device="cpu") -> Tensor:
        gen_device = generator.device if generator is not None else device
        u = torch.rand(shape, generator=generator, device=gen_device, dtype=torch.float64).to(device)
        draws = [piece.sample_sigma(shape, generator=generator, device=device) for piece in self.pieces]
        sigma = draws[-1]
        edge = 1.0
        for draw, weight in zip(reversed(draws[:-1]), reversed(self.weights[1:])):
            edge -= weight  # piece j is chosen when u < w_0 + ... + w_j
            sigma = torch.where(u < edge, draw, sigma)
        return sigma

    def weight(self, sigma: Tensor) -> Tensor:
        return self.base.weight(sigma)

    def sigma_range(self) -> tuple[float, float]:
        return self.pieces[0].sigma_range()[0], self.pieces[-1].sigma_range()[1]

    def precondition(self, backbone: nn.Module) -> nn.Module:
        return self.base.precondition(backbone)

    def cdf(self, sigma: Tensor | float) -> Tensor:
        """CDF of the union distribution (for tests and diagnostics)."""
        return sum(w * sigma_cdf(piece, sigma) for w, piece in zip(self.weights, self.pieces))


# --- sampling: one model per stage ----------------------------------------------------------------
class SwitchingDenoiser(nn.Module):
    """D(x; sigma, y) = D_s(x; sigma, y_s), where s is the stage owning each row's sigma.

    ``models`` maps every present stage name to its denoiser (one module may serve several stages).
    Stages in ``conditional`` receive the class labels; the others always receive the null label
    ``num_classes`` (None for an unconditional model), so a model trained on unlabelled synthetic
    images sees at sampling the label it was trained with, and classifier-free guidance leaves it
    unchanged. Works for a scalar sigma and for per-row sigmas, so with every sampler.
    """

    def __init__(self, ranges: StageRanges, models: Mapping[str, nn.Module],
                 conditional: Collection[str] = ("context",), num_classes: int = 0):
        super().__init__()
        missing = sorted(set(ranges.present()) - set(models))
        if missing:
            raise ValueError(f"SwitchingDenoiser needs a model for stages {missing}")
        self.ranges = ranges
        self.stage_models = nn.ModuleDict({name: models[name] for name in ranges.present()})
        self.conditional = frozenset(conditional)
        self.num_classes = num_classes

    def _labels(self, stage: str, class_labels: Tensor | None, n: int, device) -> Tensor | None:
        if stage in self.conditional:
            return class_labels
        if self.num_classes <= 0:
            return None
        return torch.full((n,), self.num_classes, dtype=torch.long, device=device)

    def forward(self, x: Tensor, sigma: Tensor | float, class_labels: Tensor | None = None) -> Tensor:
        if not isinstance(sigma, Tensor):
            sigma = torch.tensor(float(sigma), dtype=x.dtype, device=x.device)
        rows = sigma.reshape(-1).expand(x.shape[0])
        owner = self.ranges.assign(rows)
        out = None
        for index, stage in enumerate(STAGES):
            if stage not in self.stage_models:
                continue
            mask = owner == index
            if not bool(mask.any()):
                continue
            labels = self._labels(stage, class_labels, x.shape[0], x.device)
            model = self.stage_models[stage]
            if bool(mask.all()):  # the usual case: one sigma for the whole batch
                return model(x, rows, labels)
            D = model(x[mask], rows[mask], None if labels is None else labels[mask])
            if out is None:
                out = torch.empty_like(x)
            out[mask] = D.to(x.dtype)
        return out if out is not None else torch.empty_like(x)
