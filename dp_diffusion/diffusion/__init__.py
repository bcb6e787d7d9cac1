"""Diffusion parameterizations (preconditioning + losses) and samplers."""

from .losses import LOSSES, DiffusionLoss, EDMLoss, VELoss, VLoss, VPLoss, build_loss
from .precond import EDMPrecond, Precond, VEPrecond, VPPrecond, VPrecond
from .samplers import (
    SAMPLERS,
    cfg_denoise,
    generate,
    get_sampler,
    karras_sigmas,
    loglinear_sigmas,
    sample_ddim,
    sample_ddim_stochastic,
    sample_edm_heun,
)

__all__ = [
    "Precond", "EDMPrecond", "VPrecond", "VPPrecond", "VEPrecond",
    "DiffusionLoss", "EDMLoss", "VLoss", "VPLoss", "VELoss", "LOSSES", "build_loss",
    "karras_sigmas", "loglinear_sigmas", "cfg_denoise",
    "sample_ddim", "sample_ddim_stochastic", "sample_edm_heun", "SAMPLERS", "get_sampler", "generate",
]
