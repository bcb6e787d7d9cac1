"""DPDM (Dockhorn et al., TMLR 2023): a denoiser trained from scratch with DP-SGD.

Algorithm 1 of the paper is exactly `PrivateDiffusion` on the privacy core:
Poisson batch, K noise draws per example averaged before clipping (noise
multiplicity), clip to C, Gaussian noise, Adam, EMA. What is special here is
only what the guarantee covers.
"""

from __future__ import annotations

from dp_diffusion.methods.diffusion_module import PrivateDiffusion
from dp_diffusion.privacy import Coverage


class DPDM(PrivateDiffusion):
    """Differentially Private Diffusion Model."""

    def privacy_coverage(self) -> Coverage:
        return Coverage(
            released=["EMA denoiser weights (and samples drawn from it)"],
            trained_with_dp=["denoiser (all parameters)"],
        )
