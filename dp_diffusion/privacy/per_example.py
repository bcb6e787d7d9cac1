"""Per-example gradients of a per-example loss, in several interchangeable modes.

A per-example loss here is `loss_fn(model, batch) -> Tensor[B]`, deterministic
given `batch` (every random draw, e.g. diffusion noise, is part of the batch),
where `batch` is a pytree of tensors whose leading dimension is the example
index. With noise multiplicity K the loss of example i is already the average
over its K draws (DPDM Eq. 7), so the gradient of row i is the gradient of the
K-averaged loss, formed *before* clipping (DPDM Alg. 1).

Modes:
- "functorch": `torch.func.vmap(grad)` over examples; memory O(B x params)
  whatever K is. Works with any module built from pure tensor ops.
- "grouped" (the default where every trainable layer is supported): layer
  hooks capture inputs and output gradients of one input-only backward pass;
  per-example weight gradients come from native kernels, K draws summed
  inside (see `grad_samplers.py`). Memory O(B x params).
- "opacus": Opacus's `GradSampleModule` hooks on the B*K forward rows, then the
  K rows of each example are summed. Memory O(B*K x params): kept as the
  reference implementation and benchmark baseline (stock Opacus has no noise
  multiplicity; the DPDM authors forked it).
- "ghost": no per-example gradients at all: the same hooks give per-example
  gradient *norms* (ghost norms for Linear layers where cheaper, else one
  layer at a time), and a second backward of the clip-weighted loss forms the
  clipped sum (see `ghost.py`). Memory O(B x largest layer) instead of
  O(B x params), for a second backward pass; "auto" never picks it, as it
  trades time for memory.

Every mode takes gradients of the module's trainable parameters only (`torch.autograd.grad` on
them, or on the captured layer outputs; never `.backward()`): a module outside this one that the loss
passes through (a critic, a teacher) keeps its `.grad`. Frozen layers are not hooked: no per-example
gradient is formed for them, and autograd goes through them only to carry an input gradient to a
trainable layer before them.

`LayerCapture` is the hook machinery that "grouped" and "ghost" share. Hooks see a parameter only
through its layer's calls: the engine checks the chosen mode against "functorch" once, on the real
model at the first step, and refuses a model it gets wrong (`self_check.py`).
"""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager, nullcontext
from functools import partial
from typing import Any, Callable, Iterator, NamedTuple, Protocol, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value, vmap
from torch.utils._pytree import tree_flatten, tree_map

from dp_diffusion.privacy.grad_samplers import GRAD_SAMPLERS, supports, unsupported_parameters
from dp_diffusion.privacy.validation import PrivacyError

PerExampleLoss = Callable[[Callable[..., Tensor], Any], Tensor]
# Modes that form per-example gradients (`make_per_example_gradients`); "ghost"
# forms only their norms and the clipped sum (`ghost.GhostClipping`).
PER_EXAMPLE_MODES = ("grouped", "functorch", "opacus")
GRAD_MODES = ("auto", *PER_EXAMPLE_MODES, "ghost")


class PerExampleGradients(Protocol):
    """Computes `{name: Tensor[B, *param.shape]}` and the per-example losses.

    `last_norms` is the per-example L2 norm over all trainable parameters of
    the last call's gradients when the engine took it on the way (else None).
    """

    last_norms: Tensor | None

    def __call__(self, loss_fn: PerExampleLoss, batch: Any) -> tuple[dict[str, Tensor], Tensor]:
        ...


def batch_size_of(batch: Any) -> int:
    leaves, _ = tree_flatten(batch)
    tensors = [leaf for leaf in leaves if isinstance(leaf, Tensor)]
    if not tensors:
        raise ValueError("a batch must contain at least one tensor")
    return int(tensors[0].shape[0])


def trainable_parameters(module: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in module.named_parameters() if p.requires_grad}


class FunctorchGradients:
    """Per-example gradients by `vmap(grad(loss of one example))`."""

    last_norms = None

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self, loss_fn: PerExampleLoss, batch: Any) -> tuple[dict[str, Tensor], Tensor]:
        params = {k: p.detach() for k, p in trainable_parameters(self.module).items()}
        frozen = {k: p.detach() for k, p in self.module.named_parameters() if not p.requires_grad}
        buffers = dict(self.module.named_buffers())
        if batch_size_of(batch) == 0:
            return _empty_grads(params), torch.zeros(0)

        def one_example(trainable: dict[str, Tensor], example: Any) -> Tensor:
            example = tree_map(lambda t: t.unsqueeze(0) if isinstance(t, Tensor) else t, example)

            def model(*args: Any, **kwargs: Any) -> Tensor:
                return functional_call(self.module, ({**trainable, **frozen}, buffers), args, kwargs)

            return loss_fn(model, example).sum()

        grads, losses = vmap(grad_and_value(one_example), in_dims=(None, 0))(params, batch)
        return grads, losses.detach()


class OpacusHookGradients:
    """Per-example gradients by Opacus's `GradSampleModule` hooks (reference mode)."""

    last_norms = None

    def __init__(self, module: nn.Module) -> None:
        from opacus import GradSampleModule

        self.module = module
        # Kept outside the module tree so state_dict keys stay those of `module`.
        self._wrapped = [GradSampleModule(module, batch_first=True, loss_reduction="sum")]

    def __call__(self, loss_fn: PerExampleLoss, batch: Any) -> tuple[dict[str, Tensor], Tensor]:
        params = trainable_parameters(self.module)
        num_examples = batch_size_of(batch)
        if num_examples == 0:
            return _empty_grads(params), torch.zeros(0)
        for p in params.values():
            p.grad_sample = None
        with torch.enable_grad():
            losses = loss_fn(self._wrapped[0], batch)
            # Gradients of this module's trainable parameters only (the hooks fill grad_sample on the
            # way): a module outside it that the loss passes through (a critic) keeps its .grad.
            torch.autograd.grad(losses.sum(), list(params.values()), allow_unused=True)
        grads = {}
        for name, p in params.items():
            rows = p.grad_sample
            if rows is None:  # the loss reached it, but not through a layer Opacus hooks (or not at all)
                raise PrivacyError(f"privacy.grad_mode=opacus formed no per-example gradient for {name}: it is used "
                                   "outside the layers Opacus hooks (or not by the loss); use grad_mode=grouped or "
                                   "functorch")
            # The loss repeats each example K times contiguously (B*K rows);
            # the example's gradient is the sum over its K rows.
            grads[name] = rows.reshape(num_examples, -1, *p.shape).sum(dim=1)
            p.grad_sample = None
        return grads, losses.detach()


class CapturedCall(NamedTuple):
    """One call of a hooked layer: its (detached) input, its output, whose gradient is asked for,
    the layer's own trainable parameters, and whether its input needed a gradient (if not, the
    call starts a branch of the graph, e.g. the first conv or a label embedding)."""

    layer: nn.Module
    activations: Tensor
    output: Tensor
    params: tuple[nn.Parameter, ...]
    input_needs_grad: bool


def check_hookable(module: nn.Module, mode: str) -> None:
    """Raise a one-line PrivacyError unless layer hooks see every trainable parameter of `module`.

    (Uses of a seen parameter outside its layer's call are caught at the first step: `self_check.py`.)
    """
    unseen = unsupported_parameters(module)
    if unseen:
        more = f" and {len(unseen) - 3} more" if len(unseen) > 3 else ""
        raise PrivacyError(
            f"privacy.grad_mode={mode} supports only {', '.join(t.__name__ for t in GRAD_SAMPLERS)} "
            f"parameters (plain weight and bias, no parametrization such as weight_norm), not "
            f"{', '.join(unseen[:3])}{more}; use grad_mode=functorch for this model"
        )
    compiled_in_place = any(getattr(m, "_compiled_call_impl", None) is not None for m in module.modules())
    if isinstance(module, torch._dynamo.eval_frame.OptimizedModule) or compiled_in_place:
        raise PrivacyError(f"privacy.grad_mode={mode} cannot see inside a torch.compile'd module; "
                           "use grad_mode=functorch or compile only for sampling")


class LayerCapture:
    """Forward hooks on every supported layer of `module` with trainable parameters.

    Inactive (a no-op) except inside `recording(num_examples)`, which yields the list the
    layer calls of that forward are appended to, in call order.

    Every sampler reads the rows of a call's input as B examples times K draws, example-major. A call
    whose input does not have the same B*K leading rows as the first call's (a multiple of B) is refused
    (e.g. a sequence-first Linear: its leading dim is positions). Rows that have the right count but
    are not example-major cannot be seen here; the first step's check (`self_check.py`) catches those.
    """

    def __init__(self, module: nn.Module) -> None:
        self._records: list[CapturedCall] | None = None
        self._num_examples = 0
        # Looked up once here, not on every call: the backward hooks run ~140 times per step.
        self._params: dict[nn.Module, tuple[nn.Parameter, ...]] = {}
        self._names: dict[nn.Module, str] = {}
        for name, layer in module.named_modules():
            params = tuple(p for p in layer.parameters(recurse=False) if p.requires_grad)
            if type(layer) in GRAD_SAMPLERS and params:
                self._params[layer] = params
                self._names[layer] = name or type(layer).__name__
                layer.register_forward_hook(self._capture)

    @contextmanager
    def recording(self, num_examples: int) -> Iterator[list[CapturedCall]]:
        """Record the layer calls of a forward over `num_examples` examples."""
        self._records = records = []
        self._num_examples = num_examples
        try:
            yield records
        finally:
            self._records = None

    def _check_rows(self, layer: nn.Module, rows: int) -> None:
        """Raise PrivacyError unless `rows` is the B*K leading rows every call of this forward has."""
        expected = self._records[0].activations.shape[0] if self._records else rows
        if rows != expected or rows == 0 or rows % self._num_examples:
            first = f"the first hooked layer, {self._names[self._records[0].layer]}, got {expected}" \
                if self._records else f"B={self._num_examples}"
            raise PrivacyError(
                f"per-example gradients: layer {self._names[layer]} ({type(layer).__name__}) got an input with "
                f"{rows} leading rows, expected B*K example-major rows ({first}); a sequence-first or "
                "unbatched input mixes examples: use privacy.grad_mode=functorch or make its input batch-first"
            )

    def _capture(self, layer: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor | None:
        if self._records is None:
            return None
        self._check_rows(layer, inputs[0].shape[0] if inputs[0].dim() else 0)
        if not output.requires_grad:
            # Nothing upstream needs a gradient (first layer, label embedding):
            # make the output a leaf so its gradient can be asked for.
            output = output.detach().requires_grad_(True)
        self._records.append(CapturedCall(layer, inputs[0].detach(), output, self._params[layer],
                                          inputs[0].requires_grad))
        return output


def layer_call_inputs(call: CapturedCall, out_grad: Tensor | None) -> tuple[Tensor, Tensor]:
    """A captured call's activations and output gradient, in its parameters' dtype (for `GRAD_SAMPLERS`)."""
    if out_grad is None:
        # The layer ran but its output is not on the loss's autograd path
        # (e.g. a compiled graph): its gradients would silently be zero.
        raise RuntimeError(f"per-example gradients: no gradient reached {type(call.layer).__name__}; "
                           "use privacy.grad_mode=functorch for this model")
    # Under autocast, activations and output gradients may differ in dtype.
    dtype = call.params[0].dtype
    activations = call.activations
    if activations.is_floating_point() and activations.dtype != dtype:
        activations = activations.to(dtype)
    return activations, out_grad if out_grad.dtype == dtype else out_grad.to(dtype)


def accumulate_layer_grads(
    calls: list[CapturedCall],
    out_grads: Sequence[Tensor | None],
    num_examples: int,
    per_param: dict[nn.Parameter, Tensor],
) -> None:
    """Add each call's per-example parameter gradients into `per_param` (summed over calls of shared layers)."""
    for call, g in zip(calls, out_grads):
        activations, g = layer_call_inputs(call, g)
        for p, grad in GRAD_SAMPLERS[type(call.layer)](call.layer, activations, g, num_examples, call.output).items():
            per_param[p] = per_param[p] + grad if p in per_param else grad


def parameter_uses(calls: Sequence[CapturedCall]) -> Counter[nn.Parameter]:
    """How many of `calls` use each trainable parameter (a layer called twice, a weight tied between layers)."""
    return Counter(p for call in calls for p in call.params)


class NormsOnTheWay:
    """Per-example gradient norms over every trainable parameter the captured calls touch, taken as
    the calls' output gradients arrive.

    `add` forms a call's per-example gradients into `per_param` (summed over the calls of a layer
    called twice or a tied weight) and takes a parameter's part of the norm as soon as its last call
    is in, while its gradients are still in cache (the clipping then need not read them all once
    more); `keep=False` frees them then. `add_squared` adds a part found another way (a ghost norm).
    """

    def __init__(self, calls: Sequence[CapturedCall], num_examples: int, keep: bool = True) -> None:
        self.num_examples = num_examples
        self.keep = keep
        self.calls_left = parameter_uses(calls)
        self.per_param: dict[nn.Parameter, Tensor] = {}
        self._norms: list[Tensor] = []
        self._squared: list[Tensor] = []

    def add(self, call: CapturedCall, out_grad: Tensor | None) -> None:
        accumulate_layer_grads([call], [out_grad], self.num_examples, self.per_param)
        for p in call.params:
            self.calls_left[p] -= 1
            if self.calls_left[p] == 0:
                grads = self.per_param[p] if self.keep else self.per_param.pop(p)
                self._norms.append(row_norms(grads.reshape(self.num_examples, -1)))

    def add_squared(self, squared_norms: Tensor) -> None:
        self._squared.append(squared_norms)

    def squared(self, device: torch.device) -> Tensor:
        """Tensor[B]: the per-example squared norms, all parts summed."""
        total = torch.zeros(self.num_examples, device=device)
        if self._norms:
            total = total + torch.stack(self._norms).square().sum(dim=0)
        if self._squared:
            total = total + torch.stack(self._squared).sum(dim=0)
        return total


class GroupedGradients:
    """Per-example gradients from layer hooks and grouped native kernels (no autograd weight grads)."""

    def __init__(self, module: nn.Module) -> None:
        check_hookable(module, "grouped")
        self.module = module
        self.capture = LayerCapture(module)
        self.last_norms: Tensor | None = None

    def __call__(self, loss_fn: PerExampleLoss, batch: Any) -> tuple[dict[str, Tensor], Tensor]:
        params = trainable_parameters(self.module)
        num_examples = batch_size_of(batch)
        self.last_norms = None
        if num_examples == 0:
            return _empty_grads(params), torch.zeros(0)
        # Detached parameters: autograd computes input gradients only; the
        # weight gradients are formed per example from the captured tensors,
        # each layer's as soon as its output gradient exists.
        detached = {k: p.detach() for k, p in self.module.named_parameters()}
        with self.capture.recording(num_examples) as records, torch.enable_grad():
            losses = loss_fn(lambda *a, **kw: functional_call(self.module, detached, a, kw), batch)
            norms = NormsOnTheWay(records, num_examples)
            stream_output_grads(losses, records, lambda i, g: norms.add(records[i], g))
        grads = {
            name: norms.per_param[p] if p in norms.per_param else p.new_zeros((num_examples, *p.shape))
            for name, p in params.items()
        }
        self.last_norms = norms.squared(losses.device).sqrt()
        return grads, losses.detach()


def stream_output_grads(losses: Tensor, records: list[CapturedCall], take: Callable[[int, Tensor], None],
                        retain_graph: bool = False) -> None:
    """One backward of `losses.sum()` that calls `take(i, grad)` once per captured call i, as soon as
    autograd has that call's output gradient, with autocast off.

    Gradients are asked only for the outputs of calls whose input needed none (the first layer of
    each branch); every other captured output lies on the way to one of those, and its hook hands it
    to `take` there. So no parameter gradient is formed, and output gradients (as large as the
    activations) are freed as the pass goes instead of all being held until it ends (DPDM UNet,
    B=64, K=8: peak RSS growth 10.1 -> 8.6 GB). Outputs the hooks did not reach (an input that itself
    needs a gradient) get a second pass.
    """
    done: set[int] = set()
    device_type = losses.device.type
    # Entered only when autocast is on: entering it ~140 times a step costs ~5 ms on CPU.
    full_precision = (partial(torch.autocast, device_type=device_type, enabled=False)
                      if torch.is_autocast_enabled(device_type) else nullcontext)

    def once(index: int, g: Tensor) -> None:
        if index in done:  # a later pass may reach an already-handled output again
            return
        done.add(index)
        with full_precision():
            take(index, g)

    handles = [r.output.register_hook(lambda g, i=i: once(i, g)) for i, r in enumerate(records)]
    try:
        roots = [i for i, r in enumerate(records) if not r.input_needs_grad]
        total = losses.sum()
        if roots:
            root_grads = torch.autograd.grad(total, [records[i].output for i in roots],
                                             retain_graph=True, allow_unused=True)
            for i, g in zip(roots, root_grads):
                if g is not None:
                    once(i, g)
        rest = [i for i in range(len(records)) if i not in done]
        if rest:
            rest_grads = torch.autograd.grad(total, [records[i].output for i in rest],
                                             retain_graph=retain_graph, allow_unused=True)
            for i, g in zip(rest, rest_grads):
                if i not in done:
                    if g is None:
                        layer_call_inputs(records[i], None)  # raises: no gradient reached the layer
                    once(i, g)
    finally:
        for handle in handles:
            handle.remove()


def row_norms(rows: Tensor) -> Tensor:
    """L2 norm of each row, in float32 at least (a bf16 norm could round below the true one)."""
    return torch.linalg.vector_norm(rows, dim=1, dtype=torch.promote_types(rows.dtype, torch.float32))


def _empty_grads(params: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: p.new_zeros((0, *p.shape)) for k, p in params.items()}


def make_per_example_gradients(module: nn.Module, mode: str = "auto") -> PerExampleGradients:
    """The per-example gradient engine for `module` ("auto" picks the fastest correct one)."""
    if mode == "auto":
        mode = "grouped" if supports(module) else "functorch"
    if mode == "grouped":
        return GroupedGradients(module)
    if mode == "functorch":
        return FunctorchGradients(module)
    if mode == "opacus":
        return OpacusHookGradients(module)
    if mode == "ghost":
        raise ValueError("privacy.grad_mode=ghost forms clipped sums, not per-example gradients; "
                         "use dp_diffusion.privacy.ghost.GhostClipping")
    raise ValueError(f"privacy.grad_mode must be one of {GRAD_MODES}, got {mode!r}")
