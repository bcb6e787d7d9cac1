"""DP-SAD's per-example losses: distillation, and the adversarial game of student and discriminator.

One DP-SAD step (reference notes, section 1.2, reconstructed from a third-party summary):

    L_student = MSE(teacher, student) + MSE(target, student) + lambda * L_adv     (lambda = 1)

at one random step r per example (or K of them, averaged per example before clipping, as
DPDM's noise multiplicity), with the discriminator trained against L_adv. "MSE(true noise,
student)" is the ordinary diffusion loss: here the target is whatever the parameterization
regresses onto (x_0 for this framework's preconditioned denoisers, the noise for an
epsilon-predictor), with its weight lambda(sigma) if it has one.

The pairing. The summary gives the generator term as log(1 - D(C(x_psi, x_theta))) and the
labels as "[1,0] teacher / [0,1] student" on one concatenated pair, which does not say what a
real pair is. We use an order game: the discriminator sees (teacher, student) as real and the
swapped (student, teacher) as fake, i.e. it learns which slot holds the teacher. Its
equilibrium is the paper's aim, student = teacher (then both orders are the same input). The
losses are the non-saturating ones (Goodfellow et al. 2014, section 3): the discriminator
minimises the binary cross-entropy of both orders, the student the same with the labels flipped.

Every function returns one loss per example, shape (B,), for B*K rows ordered example-major
(row i*K + k is draw k of example i), averaged over the K draws: what the privacy core clips.
Gradients go where they belong: the teacher's output is always detached, the discriminator's
loss detaches the student's output too. The student's loss still reaches the discriminator's
parameters through autograd; the privacy core takes gradients of the part it steps only.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


def per_example(rows: Tensor, num_examples: int) -> Tensor:
    """(B*K,) row losses -> (B,): each example's mean over its K draws (DPDM Eq. 7)."""
    if rows.shape[0] % max(num_examples, 1) != 0:
        raise ValueError(f"{rows.shape[0]} rows do not split into {num_examples} examples")
    return rows.reshape(num_examples, -1).mean(dim=1)


def _mse_rows(a: Tensor, b: Tensor) -> Tensor:
    return ((a - b) ** 2).flatten(1).mean(dim=1)


def distillation_loss(teacher_out: Tensor, student_out: Tensor, target: Tensor, num_examples: int,
                      weight: Tensor | None = None) -> Tensor:
    """(B,): weight * (MSE(teacher, student) + MSE(target, student)), averaged over the K draws.

    `weight` (B*K,) is the parameterization's lambda(sigma) (None: 1); MSE is averaged over pixels.
    """
    rows = _mse_rows(student_out, teacher_out.detach()) + _mse_rows(student_out, target)
    if weight is not None:
        rows = weight.reshape(-1).to(rows.dtype) * rows
    return per_example(rows, num_examples)


def order_game_logits(discriminator: nn.Module, teacher_out: Tensor, student_out: Tensor, noise_labels: Tensor,
                      class_labels: Tensor | None = None, x: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(real, fake) logits, (B*K,) each: D(teacher, student) and D(student, teacher) at the same (x_r, r)."""
    real = discriminator(teacher_out, student_out, noise_labels, class_labels, x)
    fake = discriminator(student_out, teacher_out, noise_labels, class_labels, x)
    return real, fake


def student_adversarial_loss(discriminator: nn.Module, teacher_out: Tensor, student_out: Tensor,
                             noise_labels: Tensor, num_examples: int, class_labels: Tensor | None = None,
                             x: Tensor | None = None) -> Tensor:
    """(B,): the student's non-saturating loss, -log D(student, teacher) - log(1 - D(teacher, student))."""
    real, fake = order_game_logits(discriminator, teacher_out.detach(), student_out, noise_labels, class_labels, x)
    return per_example(F.softplus(-fake) + F.softplus(real), num_examples)


def discriminator_loss(discriminator: nn.Module, teacher_out: Tensor, student_out: Tensor, noise_labels: Tensor,
                       num_examples: int, class_labels: Tensor | None = None, x: Tensor | None = None) -> Tensor:
    """(B,): the discriminator's loss, -log D(teacher, student) - log(1 - D(student, teacher)); outputs detached."""
    real, fake = order_game_logits(discriminator, teacher_out.detach(), student_out.detach(), noise_labels,
                                   class_labels, x)
    return per_example(F.softplus(-real) + F.softplus(fake), num_examples)


def student_loss(distillation: Tensor, adversarial: Tensor, adversarial_weight: float = 1.0) -> Tensor:
    """(B,): DP-SAD's L_dis + lambda * L_adv (lambda = 1 is the paper's best, reference notes 1.5)."""
    if adversarial_weight < 0:
        raise ValueError(f"the adversarial weight lambda must be >= 0, got {adversarial_weight}")
    return distillation if adversarial_weight == 0 else distillation + adversarial_weight * adversarial
