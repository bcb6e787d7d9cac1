"""A one-time check, at the first logical step, that the chosen per-example gradient path is right for the model.

Layer hooks (grad_mode grouped and ghost; Opacus's too) see a parameter only through its layer's
calls, and read the rows of each call's input as B examples times K draws, example-major. A model
that also uses a weight elsewhere (`F.linear(x, layer.weight)`) or feeds a layer a sequence-first
input gets wrong per-example gradients, and under ghost clipping an example's contribution can then
exceed C. So, before the first update, on the first (up to) 4 examples of the first logical batch:

1. no layer mixes examples: BatchNorm by type, and any module whose buffers a training forward
   changes (`validation.check_buffers_unchanged`), whatever the mode;
2. grouped, ghost: every trainable parameter on the loss's autograd graph belongs to a hooked layer
   call of that forward, and each call's input has the B*K leading rows (the hooks' assertion in
   `per_example.LayerCapture`);
3. the mode's per-example gradients (ghost: its per-example norms and clipped sum) agree with
   functorch's (`FunctorchGradients`: `torch.func.vmap(grad)` of the per-example loss) to a relative
   error of 1e-3 (5e-2 for 16-bit parameters), per parameter, against the example's whole gradient
   norm. Trainable parameters that are all zero (zero-initialised output layers would leave every
   gradient before them zero and the comparison empty) are set to small values from a generator of
   the check's own for this, and zeroed again after it. It runs with dropout layers off (the two
   sides must not draw different masks) and autocast off (bf16 rounding is not what is checked).

Privacy: the check reads a few private examples, but its only output is pass or refuse (a one-line
`PrivacyError`, or auto's fallback below), decided before any update. Nothing it computes is
released, logged or kept; the CPU and CUDA random states are restored after it, so the streams
that sampling and noise draw from do not move.

With grad_mode=auto a failure of 2 or 3 falls back to functorch, with a warning, instead of
refusing. functorch is trustworthy there: each example's gradient is taken from a batch of that
example alone with every parameter substituted by `functional_call`, so no use of a parameter is
missed or attributed to another example, and what it cannot see (a statistic of the batch kept in
a buffer) is refused by 1 in every mode. Where vmap cannot run the model, the reference is a loop
of one backward per example, and auto refuses rather than falling back.

Cost, one-time: about 3 forward passes and 2 per-example gradient passes over 4 examples. On the
DPDM UNet (`model=tiny`, 28x28, K=1) on a shared 2-core CPU, one thread (`measure`): 430 ms for grouped
and 520 ms for ghost, where a step over those 4 examples takes 140 and 190 ms.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING, Any, Iterator

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from dp_diffusion.privacy.clipping import clip_factors
from dp_diffusion.privacy.per_example import (
    FunctorchGradients,
    GroupedGradients,
    LayerCapture,
    OpacusHookGradients,
    PerExampleLoss,
    batch_size_of,
    trainable_parameters,
)
from dp_diffusion.privacy.validation import PrivacyError, check_buffers_unchanged, check_no_batch_mixing

if TYPE_CHECKING:
    from dp_diffusion.privacy.engine import PrivateOptimization

log = logging.getLogger(__name__)
CHECKED_EXAMPLES = 4


def first_step_check(engine: PrivateOptimization, loss_fn: PerExampleLoss, batch: Any) -> bool:
    """Check `engine`'s per-example path on the first examples of `batch` (see the module docstring).

    Raises PrivacyError on a model the mode gets wrong; under grad_mode=auto may switch
    `engine.gradients` to functorch instead. Returns whether the check is done: False while the
    batches had fewer than 2 examples (rows cannot be mis-attributed in a batch of one), so the
    engine calls it again at the next step.
    """
    num_examples = min(CHECKED_EXAMPLES, batch_size_of(batch))
    if num_examples == 0:
        return False
    module = engine.module
    rows = tree_map(lambda t: t[:num_examples] if isinstance(t, Tensor) else t, batch)
    mode = mode_of(engine)
    check_no_batch_mixing(module)
    device = next(module.parameters(), torch.empty(0)).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        with torch.no_grad():
            check_buffers_unchanged(module, lambda: loss_fn(module, rows))
        if mode == "functorch":  # the reference itself
            return num_examples >= 2
        with _comparable(module, device):
            problem = _mode_problem(engine, mode, loss_fn, rows)
        fallback = problem is not None and engine.spec.grad_mode == "auto" and _functorch_runs(module, loss_fn, rows)
    if problem is None:
        return num_examples >= 2
    if fallback:
        log.warning("%s; privacy.grad_mode=auto falls back to functorch for this model", problem)
        engine.gradients = FunctorchGradients(module)
        return True
    raise PrivacyError(problem if "grad_mode=functorch" in problem else f"{problem}; use privacy.grad_mode=functorch")


def mode_of(engine: PrivateOptimization) -> str:
    """The gradient mode the engine actually runs ("auto" resolved)."""
    if engine.ghost is not None:
        return "ghost"
    kinds = {GroupedGradients: "grouped", FunctorchGradients: "functorch", OpacusHookGradients: "opacus"}
    return kinds.get(type(engine.gradients), type(engine.gradients).__name__)


def _mode_problem(engine: PrivateOptimization, mode: str, loss_fn: PerExampleLoss, rows: Any) -> str | None:
    """A one-line description of what the mode gets wrong on `rows`, or None."""
    module = engine.module
    prefix = f"privacy.grad_mode={mode}"
    capture = engine.ghost.capture if engine.ghost is not None else getattr(engine.gradients, "capture", None)
    try:
        if capture is not None:
            unseen = unhooked_parameters(module, capture, loss_fn, rows)
            if unseen:
                return (f"{prefix}: parameter {unseen[0]} is used in the forward outside any hooked layer call, "
                        "so its per-example gradients are not seen")
        with _opacus_hooks_off(engine):  # they would capture the reference's activations too
            reference = reference_gradients(module, loss_fn, rows)
        errors = (_ghost_errors(engine, loss_fn, rows, reference) if mode == "ghost"
                  else _gradient_errors(engine.gradients(loss_fn, rows)[0], reference))
    except PrivacyError as err:  # the hooks' row assertion
        return f"{prefix}: {err}"
    worst = max(errors, key=errors.get) if errors else None
    tolerance = 5e-2 if _computes_in_16_bit(module, loss_fn, rows) else 1e-3
    if worst is None or errors[worst] <= tolerance:
        return None
    what = "per-example norms and clipped sum" if mode == "ghost" else "per-example gradients"
    return (f"{prefix}: {what} disagree with functorch's on the first examples (worst: {worst}, relative error "
            f"{errors[worst]:.3g}); a weight used outside its layer's call or a sequence-first input does this")


def unhooked_parameters(module: nn.Module, capture: LayerCapture, loss_fn: PerExampleLoss, rows: Any) -> list[str]:
    """Names of trainable parameters on the loss's autograd graph that no hooked layer call of the forward uses."""
    names = {id(p): name for name, p in trainable_parameters(module).items()}
    with capture.recording(batch_size_of(rows)) as calls, torch.enable_grad():
        losses = loss_fn(module, rows)
    hooked = {id(p) for call in calls for p in call.params}
    return [names[i] for i in parameters_in_graph(losses) if i in names and i not in hooked]


def parameters_in_graph(output: Tensor) -> list[int]:
    """ids of the leaf tensors that `output`'s autograd graph accumulates gradients into."""
    found: list[int] = []
    seen: set[Any] = set()
    stack = [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # an AccumulateGrad node
        if variable is not None:
            found.append(id(variable))
        stack.extend(next_node for next_node, _ in node.next_functions)
    return found


def _functorch_runs(module: nn.Module, loss_fn: PerExampleLoss, rows: Any) -> bool:
    """Whether grad_mode=functorch can train this model (vmap supports every op of its training forward)."""
    try:
        FunctorchGradients(module)(loss_fn, rows)
    except Exception:  # noqa: BLE001  whatever vmap refuses
        return False
    return True


def reference_gradients(module: nn.Module, loss_fn: PerExampleLoss, rows: Any) -> dict[str, Tensor]:
    """Per-example gradients by functorch, or (where vmap cannot run the model) one backward per example."""
    try:
        return FunctorchGradients(module)(loss_fn, rows)[0]
    except Exception:  # noqa: BLE001  vmap lacks some ops; the loop below is exact for any model
        params = trainable_parameters(module)
        per_example = []
        for i in range(batch_size_of(rows)):
            example = tree_map(lambda t, i=i: t[i:i + 1] if isinstance(t, Tensor) else t, rows)
            with torch.enable_grad():
                grads = torch.autograd.grad(loss_fn(module, example).sum(), list(params.values()), allow_unused=True)
            per_example.append([torch.zeros_like(p) if g is None else g for p, g in zip(params.values(), grads)])
        return {name: torch.stack([g[j] for g in per_example]) for j, name in enumerate(params)}


def _example_norms(grads: dict[str, Tensor]) -> Tensor:
    return torch.stack([g.flatten(1).double().norm(dim=1) for g in grads.values()]).norm(dim=0)


def _gradient_errors(grads: dict[str, Tensor], reference: dict[str, Tensor]) -> dict[str, float]:
    """Per parameter: the largest per-example error, relative to that example's whole gradient norm."""
    norms = _example_norms(reference)
    scale = norms.clamp(min=norms.max().item() * 1e-6 + 1e-30)
    return {name: ((grads[name].double() - want.double()).flatten(1).norm(dim=1) / scale).max().item()
            for name, want in reference.items()}


def _ghost_errors(engine: PrivateOptimization, loss_fn: PerExampleLoss, rows: Any,
                  reference: dict[str, Tensor]) -> dict[str, float]:
    """Errors of ghost clipping's per-example norms (relative to each norm) and of its clipped sum
    per parameter (relative to the sum of the clipped norms)."""
    params = trainable_parameters(engine.module)
    saved = {name: p.grad for name, p in params.items()}
    for p in params.values():
        p.grad = None
    try:
        norms = engine.ghost(loss_fn, rows)[0].double()
        clipped = {name: p.grad for name, p in params.items()}
    finally:
        for name, p in params.items():
            p.grad = saved[name]
    want_norms = _example_norms(reference)
    scale = want_norms.clamp(min=want_norms.max().item() * 1e-6 + 1e-30)
    errors = {"per-example gradient norm": ((norms - want_norms).abs() / scale).max().item()}
    factors = clip_factors(want_norms, engine.spec.max_grad_norm)
    total = max((factors * want_norms).sum().item(), 1e-30)
    for name, want in reference.items():
        want_sum = torch.einsum("i,i...->...", factors, want.double())
        got = torch.zeros_like(want_sum) if clipped[name] is None else clipped[name].double()
        errors[name] = (got - want_sum).norm().item() / total
    return errors


@contextmanager
def _opacus_hooks_off(engine: PrivateOptimization) -> Iterator[None]:
    if not isinstance(getattr(engine, "gradients", None), OpacusHookGradients):
        yield
        return
    wrapped = engine.gradients._wrapped[0]
    wrapped.disable_hooks()
    try:
        yield
    finally:
        wrapped.enable_hooks()


def _computes_in_16_bit(module: nn.Module, loss_fn: PerExampleLoss, rows: Any) -> bool:
    """Whether the forward computes in a 16-bit float type: 16-bit parameters, or an autocast the loss itself
    enters (which the check's own autocast-off cannot undo); its gradients then agree only to bf16 rounding."""
    if any(p.dtype.itemsize <= 2 for p in trainable_parameters(module).values()):
        return True
    seen: list[bool] = []

    def record(_module: nn.Module, _inputs: Any, output: Any) -> None:
        if isinstance(output, Tensor) and output.is_floating_point():
            seen.append(output.dtype.itemsize <= 2)

    handles = [m.register_forward_hook(record) for m in module.modules()]
    try:
        with torch.no_grad():
            loss_fn(module, rows)
    finally:
        for handle in handles:
            handle.remove()
    return any(seen)


@contextmanager
def _comparable(module: nn.Module, device: torch.device) -> Iterator[None]:
    """Dropout layers off, autocast off, and all-zero trainable parameters set to small values; all undone after.

    (Not eval mode for the whole module: Opacus's hooks capture nothing outside training mode.)
    """
    modes = {m: m.training for m in module.modules()}
    zero = [p for p in trainable_parameters(module).values() if not p.detach().any()]
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in zero:
            scale = 1.0 / math.sqrt(p[0].numel()) if p.dim() >= 2 else 0.1
            p.copy_(scale * torch.randn(p.shape, generator=generator, dtype=torch.float64))
    for m in modes:
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.eval()
    autocast_off = torch.autocast(device.type, enabled=False) if device.type in ("cpu", "cuda") else nullcontext()
    try:
        with autocast_off:
            yield
    finally:
        for m, training in modes.items():
            m.training = training
        with torch.no_grad():
            for p in zero:
                p.zero_()


def measure(config: str = "tiny", batch_size: int = 4, noise_multiplicity: int = 1,
            repeats: int = 3) -> dict[str, float]:
    """Milliseconds of the first step's check (median of `repeats`) and of one step, per mode, on the DPDM
    UNet `model=<config>` at 28x28 (MNIST) with a batch of `batch_size` (the check reads at most 4 examples).

    `python -c "import torch; torch.set_num_threads(1); from dp_diffusion.privacy.self_check import measure;
    print(measure())"` gave the figures in the module docstring.
    """
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from dp_diffusion.cli import CONF_DIR
    from dp_diffusion.diffusion.losses import EDMLoss
    from dp_diffusion.privacy import PrivacyLedger, PrivacySpec, PrivateOptimization, make_plan

    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[f"model={config}"])
    torch.manual_seed(0)
    net = instantiate(cfg.model, in_channels=1, out_channels=1, resolution=28, num_classes=10)
    loss = EDMLoss(num_classes=10, label_dropout=0.1)
    denoiser = loss.precondition(net)
    images, labels = torch.randn(batch_size, 1, 28, 28), torch.arange(batch_size) % 10
    batch = (images, labels, loss.draw(images, labels, noise_multiplicity))

    def loss_fn(model: Any, b: Any) -> Tensor:
        return loss(model, b[0], b[1], b[2])

    results = {}
    for mode in ("grouped", "ghost"):
        spec = PrivacySpec(noise_multiplier=1.0, grad_mode=mode, noise_multiplicity=noise_multiplicity, delta=1e-5)
        engine = PrivateOptimization(denoiser, torch.optim.SGD(denoiser.parameters(), lr=0.0), spec,
                                     make_plan(spec, 1000, batch_size, 10), PrivacyLedger(delta=1e-5), batch_size)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            first_step_check(engine, loss_fn, batch)
            times.append(1000 * (time.perf_counter() - start))
        results[f"{mode}_check_ms"] = sorted(times)[len(times) // 2]
        engine.first_step_checked = True
        engine.step(loss_fn, batch, optimizer_step=lambda: None)  # warm-up
        start = time.perf_counter()
        engine.step(loss_fn, batch, optimizer_step=lambda: None)
        results[f"{mode}_step_ms"] = 1000 * (time.perf_counter() - start)
    return results

