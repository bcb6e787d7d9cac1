"""DP-SAD's published mechanism: clip and noise each example's gradient at the student's output.

DP-SAD as published (Liu, Wang, Ge, ECCV 2024; reference notes, section 1.3) does not clip
the student's parameter gradients. It clips each example's gradient with respect to the
student's output, dL_i/dx_theta, to norm C, adds N(0, sigma^2 C^2) noise to it, and
back-propagates the result through dx_theta/dtheta, citing post-processing. GS-WGAN does the
same at its generator's output (a backward hook on the critic's input). `OutputSanitiser`
is that mechanism: put the student's output through it once, build every loss term on the
returned tensor, and in the backward pass each example's summed gradient from all of them is
clipped and noised before it reaches the student.

    out = sanitiser(student(x_r, r), num_examples=B)   # forward: the same values
    loss = per_example_losses(out).sum()               # backward: clip_C(g_i) + N(0, (sigma C)^2 I)

The paper's noise scaling. The summary of the paper gives the student's update as
(1/B) sum_i CLIP(g_i, C) + N(0, sigma^2 C^2 I) / (B T): "time steps dilute DP noise", T = 500.
`paper_time_dilution=T` divides the noise by T accordingly. That is the paper's accounting:
per example the sensitivity is still C, so the noise added is that of a noise multiplier
sigma / T (`effective_noise_multiplier`), and `paper_accounting` reports both figures.

NOT A GUARANTEE (reference notes, section 1.4). Even without the T scaling this mechanism does
not give (epsilon, delta)-DP for the released student under the standard per-example analysis:
the student's input x_r is a noised private image, so dx_theta/dtheta depends on the record and
multiplying by it is not post-processing; and the teacher and discriminator, whose outputs form
every example's gradient, were trained on the private data without DP, so one record changes
every term of every batch. `PAPER_ACCOUNTING_NOTE` says this in the words the report prints.
It exists to reproduce the paper's numbers; DP-SAD's `sound` variant uses DP-SGD on the
student's parameters instead.

Noise comes from the run's `NoiseStream` (the one `PrivateTrainingModule.noise` holds, shared with
every DP optimizer of the run): one draw per backward pass, so the stream's counter continues across
a resume and never repeats a draw of another mechanism of the run.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from dp_diffusion.privacy.accounting import epsilon_for
from dp_diffusion.privacy.clipping import clip_factors
from dp_diffusion.privacy.per_example import row_norms
from dp_diffusion.privacy.randomness import NoiseStream
from dp_diffusion.privacy.validation import PrivacyError

PAPER_ACCOUNTING_NOTE = (
    "DP-SAD 'paper' variant: the epsilon shown is the paper's accounting, NOT a differential-privacy "
    "guarantee for the released student. The teacher and the discriminator were trained on the private "
    "data without DP, and only each example's gradient at the student's output was clipped and noised "
    "although the student's input is a noised private image; under the standard per-example analysis "
    "neither bounds one record's effect on the released weights."
)
PAPER_TIME_DILUTION_NOTE = (
    "The noise was divided by T as the paper's 'time steps dilute DP noise' claims; the noise actually "
    "added is that of noise multiplier sigma / T."
)


class OutputSanitiser:
    """Clips each example's gradient w.r.t. a tensor to norm C and adds N(0, std^2) noise, in backward.

    Args:
        max_grad_norm: C, the bound on each example's output-gradient norm (over its K rows together).
        noise_multiplier: sigma; the noise std is sigma * C (divided by T with `paper_time_dilution`).
        noise: the run's noise stream; it must have a source (`PrivateTrainingModule.noise` once its
            randomness is made), never torch's global generator.
        expected_batch_size: the sanitised gradient is divided by it (the mean over the expected logical
            batch, as Opacus's loss_reduction="mean"); 1 (default) for the sum.
        paper_time_dilution: T to divide the noise by, as the paper does (not a guarantee, module
            docstring); None (default) for noise sigma * C.

    The loss backpropagated through the returned tensor must be the SUM of per-example losses, so that
    row block i of the incoming gradient is example i's gradient.
    """

    def __init__(self, max_grad_norm: float, noise_multiplier: float, noise: NoiseStream,
                 expected_batch_size: float = 1.0, paper_time_dilution: int | None = None) -> None:
        if not max_grad_norm > 0:
            raise PrivacyError(f"max_grad_norm (C) must be > 0, got {max_grad_norm}")
        if not noise_multiplier >= 0:
            raise PrivacyError(f"noise_multiplier (sigma) must be >= 0, got {noise_multiplier}")
        if not expected_batch_size > 0:
            raise PrivacyError(f"expected_batch_size must be > 0, got {expected_batch_size}")
        if paper_time_dilution is not None and (int(paper_time_dilution) != paper_time_dilution
                                                or paper_time_dilution < 1):
            raise PrivacyError(f"paper_time_dilution (T) must be a positive integer or None, got {paper_time_dilution}")
        if noise.source is None:
            raise PrivacyError("the output sanitiser draws its noise from the run's noise stream; got a NoiseStream "
                               "without a source (torch's global generator): pass PrivateTrainingModule.noise "
                               "after ensure_randomness()")
        self.max_grad_norm = float(max_grad_norm)
        self.noise_multiplier = float(noise_multiplier)
        self.noise = noise
        self.expected_batch_size = float(expected_batch_size)
        self.paper_time_dilution = None if paper_time_dilution is None else int(paper_time_dilution)

    @property
    def effective_noise_multiplier(self) -> float:
        """The noise added, in units of C: sigma, or sigma / T with the paper's time dilution."""
        return self.noise_multiplier / (self.paper_time_dilution or 1)

    @property
    def noise_std(self) -> float:
        """Std of the noise added to each element of each example's output gradient (before the 1/B mean)."""
        return self.effective_noise_multiplier * self.max_grad_norm

    def __call__(self, output: Tensor, num_examples: int | None = None) -> Tensor:
        """`output` unchanged in value; its gradient is sanitised in backward. `output` has B*K rows, example
        i's K rows together (noise multiplicity); `num_examples` = B (default: every row is an example)."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            raise PrivacyError("the output sanitiser runs in one process only: its noise stream would give every "
                               "rank on the same device the same noise; run the DP-SAD paper variant on one device")
        rows = output.shape[0]
        num_examples = rows if num_examples is None else int(num_examples)
        if num_examples < 1 or rows % num_examples != 0:
            raise ValueError(f"an output of {rows} rows does not split into {num_examples} examples")
        return _SanitiseGradient.apply(output, self, num_examples)

    def sanitise(self, grad: Tensor, num_examples: int) -> Tensor:
        """(clip_C(g_i) + N(0, noise_std^2 I)) / expected_batch_size for each example's rows of `grad`;
        draws one step from the noise stream."""
        per_example = grad.reshape(num_examples, -1)
        factors = clip_factors(row_norms(per_example), self.max_grad_norm).to(per_example.dtype)
        clipped = per_example * factors[:, None]
        (noise,) = self.noise.draw_step(self.noise_std, [clipped])
        return ((clipped + noise) / self.expected_batch_size).reshape(grad.shape)


class _SanitiseGradient(torch.autograd.Function):
    """Identity forward; `OutputSanitiser.sanitise` on the gradient in backward."""

    @staticmethod
    def forward(ctx: Any, output: Tensor, sanitiser: OutputSanitiser, num_examples: int) -> Tensor:
        ctx.sanitiser, ctx.num_examples = sanitiser, num_examples
        return output.view_as(output)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        return ctx.sanitiser.sanitise(grad, ctx.num_examples), None, None


def paper_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float,
                  accountant: str = "prv") -> float:
    """The paper's epsilon: that of `steps` Poisson-subsampled Gaussian steps at (sigma, q), as if the
    sanitised output gradient were the whole mechanism. NOT a guarantee: see `PAPER_ACCOUNTING_NOTE`."""
    return epsilon_for(noise_multiplier, sample_rate, steps, delta, accountant)


def paper_accounting(sanitiser: OutputSanitiser, sample_rate: float, steps: int, delta: float,
                     accountant: str = "prv") -> dict[str, Any]:
    """What a report says about the paper variant: the paper's epsilon (sigma, q, steps), with the time
    dilution the epsilon of the noise actually added (sigma / T), and the notes. Neither is a guarantee."""
    record: dict[str, Any] = {
        "mechanism": "dp_sad_output_sanitiser",
        "is_guarantee": False,
        "noise_multiplier": sanitiser.noise_multiplier,
        "max_grad_norm": sanitiser.max_grad_norm,
        "sample_rate": sample_rate,
        "steps": steps,
        "delta": delta,
        "epsilon_paper": paper_epsilon(sanitiser.noise_multiplier, sample_rate, steps, delta, accountant),
        "note": PAPER_ACCOUNTING_NOTE,
    }
    if sanitiser.paper_time_dilution is not None:
        sigma_added = sanitiser.effective_noise_multiplier
        eps_added = epsilon_for(sigma_added, sample_rate, steps, delta, accountant) if sigma_added > 0 else math.inf
        record.update(paper_time_dilution=sanitiser.paper_time_dilution, noise_multiplier_added=sigma_added,
                      epsilon_of_noise_added=eps_added, time_dilution_note=PAPER_TIME_DILUTION_NOTE)
    return record
