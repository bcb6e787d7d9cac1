"""DP-SAD's standalone parts: the discriminator, the adversarial and distillation losses, and the
paper's output-gradient sanitiser with its (non-guarantee) accounting."""

from __future__ import annotations

import copy

import pytest
import torch
from toy_models import loop_per_example_grads

from dp_diffusion.methods import adversarial
from dp_diffusion.nets.discriminator import Discriminator
from dp_diffusion.privacy.accounting import epsilon_for
from dp_diffusion.privacy.output_sanitiser import (
    PAPER_ACCOUNTING_NOTE,
    OutputSanitiser,
    paper_accounting,
    paper_epsilon,
)
from dp_diffusion.privacy.per_example import GroupedGradients, make_per_example_gradients
from dp_diffusion.privacy.randomness import NoiseStream, PrivacyRandomness
from dp_diffusion.privacy.validation import PrivacyError, check_buffers_unchanged, check_no_batch_mixing

# ---- discriminator ---------------------------------------------------------------------------------

VARIANTS = {
    "unconditional": dict(num_classes=0),
    "projection": dict(num_classes=3, class_conditioning="projection"),
    "embedding": dict(num_classes=3, class_conditioning="embedding"),
    "with_input": dict(num_classes=3, with_input=True),
}


def tiny_discriminator(variant: str) -> Discriminator:
    """A float64 8x8 discriminator with every parameter nonzero (zero-initialised layers would hide gradients)."""
    torch.manual_seed(0)
    disc = Discriminator(1, 8, nf=8, ch_mult=(1, 2), **VARIANTS[variant]).double()
    with torch.no_grad():
        for p in disc.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return disc


def pair_batch(n: int, k: int = 1, seed: int = 1):
    """(teacher, student, x_r, noise labels, class labels) with n * k rows, example-major."""
    g = torch.Generator().manual_seed(seed)
    rows = n * k
    return (torch.randn(rows, 1, 8, 8, generator=g, dtype=torch.float64),
            torch.randn(rows, 1, 8, 8, generator=g, dtype=torch.float64),
            torch.randn(rows, 1, 8, 8, generator=g, dtype=torch.float64),
            torch.rand(rows, generator=g, dtype=torch.float64) * 2 - 1,
            (torch.arange(n) % 4).repeat_interleave(k))  # label 3 = the null class


def call(disc: Discriminator, teacher, student, x, sigma, labels):
    return disc(teacher, student, sigma, labels, x if disc.with_input else None)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_discriminator_gives_one_logit_per_example(variant):
    disc = tiny_discriminator(variant)
    teacher, student, x, sigma, labels = pair_batch(5)
    assert call(disc, teacher, student, x, sigma, labels).shape == (5,)
    if disc.num_classes:  # no labels = the null class
        torch.testing.assert_close(call(disc, teacher, student, x, sigma, None),
                                   call(disc, teacher, student, x, sigma, torch.full((5,), 3)))
        assert not torch.allclose(call(disc, teacher, student, x, sigma, torch.zeros(5, dtype=torch.long)),
                                  call(disc, teacher, student, x, sigma, torch.ones(5, dtype=torch.long)))
    mnist = Discriminator(1, 28, num_classes=10)  # the default shape for 28x28 data
    assert mnist(torch.zeros(2, 1, 28, 28), torch.zeros(2, 1, 28, 28), torch.zeros(2)).shape == (2,)


def test_discriminator_refuses_bad_shapes_and_a_missing_input():
    with pytest.raises(ValueError, match="divisible by"):
        Discriminator(1, 28, ch_mult=(1, 2, 2, 2))
    with pytest.raises(ValueError, match="class_conditioning"):
        Discriminator(1, 8, num_classes=2, class_conditioning="concat", ch_mult=(1, 2), nf=8)
    disc, plain = tiny_discriminator("with_input"), tiny_discriminator("projection")
    teacher, student, x, sigma, labels = pair_batch(2)
    with pytest.raises(ValueError, match="with_input=True"):
        disc(teacher, student, sigma, labels)
    with pytest.raises(ValueError, match="with_input=False"):
        plain(teacher, student, sigma, labels, x)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_discriminator_examples_are_independent(variant):
    """Changing example j (its outputs, input, step and label) changes its logit and no other."""
    disc = tiny_discriminator(variant)
    batch = pair_batch(4)
    before = call(disc, *batch)
    changed = [t.clone() for t in batch]
    for t in changed[:3]:
        t[2] += 1.0
    changed[3][2] += 0.5
    changed[4][2] = 1
    after = call(disc, *changed)
    keep = torch.tensor([True, True, False, True])
    torch.testing.assert_close(after[keep], before[keep], rtol=0, atol=1e-12)
    assert (after[2] - before[2]).abs() > 1e-6


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_discriminator_passes_the_privacy_cores_checks(variant):
    disc = tiny_discriminator(variant)
    check_no_batch_mixing(disc)
    batch = pair_batch(3)
    logits = check_buffers_unchanged(disc, lambda: call(disc, *batch))
    assert logits.shape == (3,)
    assert isinstance(make_per_example_gradients(disc, "auto"), GroupedGradients)


@pytest.mark.parametrize("noise_multiplicity", [1, 3])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_discriminator_per_example_gradients_match_naive_loop(variant, noise_multiplicity):
    """The discriminator's own DP-SGD loss (sound variant): grouped per-example gradients of the K-averaged
    loss equal one backward per example."""
    disc = tiny_discriminator(variant)
    k = noise_multiplicity
    batch = pair_batch(4, k)

    def loss_fn(model, b):
        teacher, student, x, sigma, labels = b  # each (B, K, ...): one example's K draws together
        flat = [t.reshape(-1, *t.shape[2:]) for t in b]
        return adversarial.discriminator_loss(model, flat[0], flat[1], flat[3], num_examples=teacher.shape[0],
                                              class_labels=flat[4], x=flat[2] if disc.with_input else None)

    examples = tuple(t.reshape(4, k, *t.shape[1:]) for t in batch)
    expected = loop_per_example_grads(copy.deepcopy(disc), loss_fn, examples)
    grads, losses = make_per_example_gradients(copy.deepcopy(disc), "grouped")(loss_fn, examples)
    assert losses.shape == (4,)
    for name in expected[0]:
        for i in range(4):
            torch.testing.assert_close(grads[name][i], expected[i][name], rtol=1e-7, atol=1e-10)
    assert all(grads[name].abs().sum() > 0 for name in grads), "a parameter got no gradient"


# ---- losses -----------------------------------------------------------------------------------------

def test_losses_are_per_example_and_send_gradients_where_they_belong():
    disc = tiny_discriminator("projection")
    teacher, student, _, sigma, labels = pair_batch(3, k=2)
    teacher.requires_grad_(True)
    student.requires_grad_(True)
    target = torch.randn_like(teacher)
    distill = adversarial.distillation_loss(teacher, student, target, num_examples=3)
    adv = adversarial.student_adversarial_loss(disc, teacher, student, sigma, 3, labels)
    total = adversarial.student_loss(distill, adv, adversarial_weight=0.5)
    assert distill.shape == adv.shape == total.shape == (3,)
    torch.testing.assert_close(total, distill + 0.5 * adv)
    rows = ((student - teacher) ** 2).flatten(1).mean(1) + ((student - target) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(distill, rows.reshape(3, 2).mean(1))
    weight = torch.arange(1.0, 7.0, dtype=torch.float64)
    torch.testing.assert_close(adversarial.distillation_loss(teacher, student, target, 3, weight),
                               (weight * rows).reshape(3, 2).mean(1))
    total.sum().backward()
    assert teacher.grad is None and student.grad.abs().sum() > 0  # the teacher is frozen
    student.grad = None
    adversarial.discriminator_loss(disc, teacher, student, sigma, 3, labels).sum().backward()
    assert student.grad is None and teacher.grad is None  # the discriminator's loss reaches only it
    with pytest.raises(ValueError, match="lambda"):
        adversarial.student_loss(distill, adv, adversarial_weight=-1.0)


def test_the_order_game_is_even_when_the_student_matches_the_teacher():
    """With student = teacher both orders are the same input, so the two players' losses coincide; when they
    differ, a discriminator that tells them apart has a lower loss than the student's."""
    disc = tiny_discriminator("unconditional")
    teacher, student, _, sigma, _ = pair_batch(4)
    same_d = adversarial.discriminator_loss(disc, teacher, teacher, sigma, 4)
    same_g = adversarial.student_adversarial_loss(disc, teacher, teacher, sigma, 4)
    torch.testing.assert_close(same_d, same_g)
    assert (same_d >= 2 * torch.log(torch.tensor(2.0, dtype=torch.float64)) - 1e-12).all()
    real, fake = adversarial.order_game_logits(disc, teacher, student, sigma)
    torch.testing.assert_close(real, disc(teacher, student, sigma))
    torch.testing.assert_close(fake, disc(student, teacher, sigma))
    d_loss = adversarial.discriminator_loss(disc, teacher, student, sigma, 4)
    g_loss = adversarial.student_adversarial_loss(disc, teacher, student, sigma, 4)
    torch.testing.assert_close(d_loss - g_loss, (fake - real).double())  # softplus(-z) - softplus(z) = -z


# ---- the paper's output sanitiser ------------------------------------------------------------------

def stream(secret: bytes = b"test stream") -> NoiseStream:
    return NoiseStream(PrivacyRandomness("reproducible", secret))


def sanitised_grad(sanitiser: OutputSanitiser, upstream: torch.Tensor, num_examples: int | None = None):
    output = torch.randn_like(upstream, requires_grad=True)
    out = sanitiser(output, num_examples)
    (out * upstream).sum().backward()  # d loss / d out = upstream
    return output.grad


def test_sanitiser_leaves_the_forward_unchanged():
    output = torch.randn(4, 1, 5, 5, requires_grad=True)
    out = OutputSanitiser(1.0, 1.0, stream())(output)
    assert torch.equal(out, output) and out.requires_grad


@pytest.mark.parametrize("k", [1, 2])
def test_sanitiser_clips_each_examples_output_gradient(k):
    """sigma = 0: each example's gradient (its K rows together) has norm <= C; those under C are unchanged,
    those over C keep their direction."""
    c = 1.5
    upstream = torch.randn(4 * k, 1, 6, 6, dtype=torch.float64)
    per_example = upstream.reshape(4, -1)
    scales = torch.tensor([0.3, 0.9, 2.0, 10.0], dtype=torch.float64) * c / per_example.norm(dim=1)
    upstream = (per_example * scales[:, None]).reshape_as(upstream)
    got = sanitised_grad(OutputSanitiser(c, 0.0, stream()), upstream, num_examples=4).reshape(4, -1)
    norms = got.norm(dim=1)
    assert (norms <= c * (1 + 1e-6)).all()
    torch.testing.assert_close(got[:2], upstream.reshape(4, -1)[:2])
    torch.testing.assert_close(norms[2:], torch.full((2,), c, dtype=torch.float64), rtol=1e-5, atol=0)
    cosine = torch.nn.functional.cosine_similarity(got[2:], upstream.reshape(4, -1)[2:], dim=1)
    torch.testing.assert_close(cosine, torch.ones(2, dtype=torch.float64))
    if k == 2:  # the norm is over the example's rows together, not row by row
        rows = sanitised_grad(OutputSanitiser(c, 0.0, stream()), upstream).reshape(8, -1)
        assert not torch.allclose(rows, got.reshape(8, -1))


def test_sanitiser_reaches_the_student_as_the_clipped_gradient():
    """The student's parameter gradient is the back-propagation of the clipped output gradient (sigma = 0)."""
    torch.manual_seed(0)
    student = torch.nn.Linear(6, 3).double()
    x = torch.randn(5, 6, dtype=torch.float64) * 4
    target = torch.zeros(5, 3, dtype=torch.float64)
    out = OutputSanitiser(0.5, 0.0, stream())(student(x))
    ((out - target) ** 2).sum(1).sum().backward()
    g = 2 * (student(x) - target).detach()
    clipped = g * (0.5 / (g.norm(dim=1, keepdim=True) + 1e-6)).clamp(max=1)
    assert (g.norm(dim=1) > 0.5).any()
    torch.testing.assert_close(student.weight.grad, clipped.T @ x)
    torch.testing.assert_close(student.bias.grad, clipped.sum(0))


@pytest.mark.parametrize("dilution", [None, 50])
def test_sanitiser_noise_has_std_sigma_c(dilution):
    """Zero upstream gradient: what comes back is the noise alone; its std over many draws is sigma*C
    (sigma*C/T with the paper's time dilution), divided by the expected batch size."""
    sigma, c, batch = 1.3, 0.7, 4.0
    noise = stream()
    sanitiser = OutputSanitiser(c, sigma, noise, expected_batch_size=batch, paper_time_dilution=dilution)
    draws = torch.stack([sanitised_grad(sanitiser, torch.zeros(16, 1, 16, 16)) for _ in range(20)])
    assert noise.steps_drawn == 20  # one stream step per backward pass
    expected = sigma * c / (dilution or 1) / batch
    assert sanitiser.noise_std == pytest.approx(sigma * c / (dilution or 1))
    assert draws.std().item() == pytest.approx(expected, rel=0.02)  # 81,920 draws: std error 0.25%
    assert abs(draws.mean().item()) < 0.02 * expected
    assert not torch.allclose(draws[0], draws[1])  # each step draws fresh noise


def test_sanitiser_noise_is_reproducible_from_the_stream_and_nowhere_else():
    upstream = torch.randn(6, 1, 4, 4)
    first = [sanitised_grad(OutputSanitiser(1.0, 1.0, noise), upstream) for noise in [stream()] * 2]
    again = [sanitised_grad(OutputSanitiser(1.0, 1.0, noise), upstream) for noise in [stream()] * 2]
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    assert not torch.equal(first[0], first[1])  # the stream moved on
    torch.manual_seed(123)  # the global generator plays no part
    other = sanitised_grad(OutputSanitiser(1.0, 1.0, stream(b"another secret")), upstream)
    assert not torch.allclose(other, first[0])
    resumed = NoiseStream(PrivacyRandomness("reproducible", b"test stream"), steps_drawn=1)
    assert torch.equal(sanitised_grad(OutputSanitiser(1.0, 1.0, resumed), upstream), first[1])


def test_sanitiser_refuses_the_global_generator_and_bad_settings():
    with pytest.raises(PrivacyError, match="run's noise stream"):
        OutputSanitiser(1.0, 1.0, NoiseStream(None))
    with pytest.raises(PrivacyError, match="max_grad_norm"):
        OutputSanitiser(0.0, 1.0, stream())
    with pytest.raises(PrivacyError, match="paper_time_dilution"):
        OutputSanitiser(1.0, 1.0, stream(), paper_time_dilution=0)
    with pytest.raises(ValueError, match="does not split"):
        OutputSanitiser(1.0, 1.0, stream())(torch.zeros(5, 2), num_examples=2)


def test_paper_accounting_is_labelled_and_uses_the_accountant():
    sanitiser = OutputSanitiser(1.0, 0.9, stream(), paper_time_dilution=500)
    record = paper_accounting(sanitiser, sample_rate=0.02, steps=200, delta=1e-5, accountant="rdp")
    assert record["epsilon_paper"] == epsilon_for(0.9, 0.02, 200, 1e-5, "rdp") == paper_epsilon(
        0.9, 0.02, 200, 1e-5, "rdp")
    assert record["noise_multiplier_added"] == pytest.approx(0.9 / 500)
    assert record["epsilon_of_noise_added"] > 100 * record["epsilon_paper"]
    assert record["is_guarantee"] is False and record["note"] == PAPER_ACCOUNTING_NOTE
    assert "NOT a differential-privacy guarantee" in PAPER_ACCOUNTING_NOTE
    assert "without DP" in PAPER_ACCOUNTING_NOTE
    plain = paper_accounting(OutputSanitiser(1.0, 0.9, stream()), 0.02, 200, 1e-5, "rdp")
    assert "epsilon_of_noise_added" not in plain and plain["epsilon_paper"] == record["epsilon_paper"]
