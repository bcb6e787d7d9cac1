"""Ghost clipping: the clipped sum of per-example gradients without per-example gradients.

Two backward passes over one forward (Li et al., "Large Language Models Can Be
Strong Differentially Private Learners", ICLR 2022, Sec. 4; the per-layer
choice between ghost norm and materialising is Bu et al.'s "mixed ghost
clipping", arXiv 2205.10683):

1. Forward with the real parameters; the hooks of `LayerCapture` record each
   supported layer's input A and output. A first backward gives the output
   gradients G only (the parameters' gradients are not asked for in this pass),
   each handed over as soon as it exists and freed after its layer's norm
   (`per_example.stream_output_grads`).
2. From (A, G) each layer adds its per-example squared gradient norm:
   - Linear, when cheaper: the ghost norm, never forming dL_i/dW. With S rows
     per example (its K noise draws times any sequence positions),
     ||sum_s g_s a_s^T||_F^2 = sum_{s,s'} (g_s . g_s') (a_s . a_s'), which costs
     O(S^2) per example instead of O(in x out).
   - otherwise: that layer's per-example gradients from `grad_samplers.py`,
     their norms, then freed. Memory is O(B x largest layer), not O(B x params).
   A layer or parameter used more than once in the forward has per-example
   gradients that are sums over its calls; those are materialised and summed
   before the norm (ghost norms of the calls would not add up).
3. Clip factors c_i = min(1, C / (||g_i|| + 1e-6)), and a second backward of
   sum_i c_i L_i on the retained graph gives sum_i c_i g_i: the clipped sum.

Noise multiplicity needs nothing extra: the loss of example i already averages
its K draws, and the K draws' rows are among its S rows above.
"""

from __future__ import annotations

import functools
from typing import Any, Iterable, Sequence

import torch
from torch import Tensor, nn

from dp_diffusion.privacy.clipping import clip_factors
from dp_diffusion.privacy.grad_samplers import GRAD_SAMPLERS
from dp_diffusion.privacy.per_example import (
    CapturedCall,
    LayerCapture,
    PerExampleLoss,
    accumulate_layer_grads,
    batch_size_of,
    check_hookable,
    layer_call_inputs,
    parameter_uses,
    stream_output_grads,
    trainable_parameters,
)


def ghost_norm_is_cheaper(layer: nn.Linear, rows_per_example: int) -> bool:
    """Whether the ghost norm of a Linear layer beats materialising its per-example weight gradient.

    Ghost: S x S Gram matrices per example (S rows each); materialising: in x out per example.
    """
    return rows_per_example**2 < layer.in_features * layer.out_features


def linear_ghost_sq_norms(layer: nn.Linear, a: Tensor, g: Tensor, num_examples: int) -> Tensor:
    """Per-example squared norm of a Linear layer's parameter gradients, Tensor[B], by the ghost norm.

    `a` and `g` are the layer's input and output gradient with B*K example-major
    rows (any further leading dims, e.g. sequence positions, are rows too).
    """
    a = a.reshape(num_examples, -1, a.shape[-1])
    g = g.reshape(num_examples, -1, g.shape[-1])
    sq = g.new_zeros(num_examples)
    if layer.weight.requires_grad:
        # ||sum_s g_s a_s^T||_F^2 = <G G^T, A A^T>_F (Li et al. 2022, Sec. 4).
        sq = sq + (torch.bmm(g, g.transpose(1, 2)) * torch.bmm(a, a.transpose(1, 2))).sum(dim=(1, 2))
    if layer.bias is not None and layer.bias.requires_grad:
        sq = sq + g.sum(dim=1).pow(2).sum(dim=1)
    return sq


def materialised_sq_norms(layer: nn.Module, a: Tensor, g: Tensor, num_examples: int,
                          output: Tensor | None = None) -> Tensor:
    """Per-example squared norm of a layer's parameter gradients, Tensor[B], from its per-example gradients."""
    grads = GRAD_SAMPLERS[type(layer)](layer, a, g, num_examples, output)
    return _sq_norms(grads.values(), num_examples, g)


def _sq_norms(grads: Iterable[Tensor], num_examples: int, like: Tensor) -> Tensor:
    sq = like.new_zeros(num_examples)
    for grad in grads:
        sq = sq + grad.reshape(num_examples, -1).pow(2).sum(dim=1)
    return sq


def layer_sq_norms(call: CapturedCall, out_grad: Tensor | None, num_examples: int) -> Tensor:
    """Per-example squared gradient norm of one layer call: ghost norm where cheaper, else materialised."""
    a, g = layer_call_inputs(call, out_grad)
    layer = call.layer
    if type(layer) is nn.Linear and ghost_norm_is_cheaper(layer, a.numel() // (num_examples * layer.in_features)):
        return linear_ghost_sq_norms(layer, a, g, num_examples)
    return materialised_sq_norms(layer, a, g, num_examples, call.output)


class StreamedNorms:
    """Per-example gradient norms over every trainable parameter of `calls`, taken call by call as
    their output gradients arrive (`take`), so at most one layer's per-example gradients exist at once.

    A parameter used by several calls (a layer called twice, a tied weight) has per-example
    gradients that are sums over its calls: those calls' gradients are summed as they come and its
    norm is taken after its last call.
    """

    def __init__(self, calls: Sequence[CapturedCall], num_examples: int) -> None:
        self.num_examples = num_examples
        self.calls_left = parameter_uses(calls)
        self.shared = {p for p, uses in self.calls_left.items() if uses > 1}
        self.per_param: dict[nn.Parameter, Tensor] = {}
        self.parts: list[Tensor] = []

    def take(self, call: CapturedCall, out_grad: Tensor | None) -> None:
        if not any(p in self.shared for p in call.params):
            self.parts.append(layer_sq_norms(call, out_grad, self.num_examples))
            return
        accumulate_layer_grads([call], [out_grad], self.num_examples, self.per_param)
        for p in call.params:
            self.calls_left[p] -= 1
            if self.calls_left[p] == 0:
                summed = self.per_param.pop(p)
                self.parts.append(_sq_norms([summed], self.num_examples, summed))

    def norms(self) -> Tensor:
        """Tensor[B]: sqrt of the summed squared norms."""
        if not self.parts:
            return torch.zeros(self.num_examples)
        dtype = functools.reduce(torch.promote_types, (part.dtype for part in self.parts))
        sq = torch.stack([part.to(dtype) for part in self.parts]).sum(dim=0)
        # <G G^T, A A^T> >= 0 exactly, but rounding can leave a tiny negative.
        return sq.clamp(min=0).sqrt()


class GhostClipping:
    """Adds the clipped sum sum_i min(1, C/||g_i||) g_i of a per-example loss to `p.grad` (ghost clipping).

    Memory O(B x largest layer) instead of O(B x params) for the per-example
    gradients, at the price of a second backward pass.
    """

    def __init__(self, module: nn.Module, max_grad_norm: float) -> None:
        check_hookable(module, "ghost")
        self.module = module
        self.max_grad_norm = max_grad_norm
        self.capture = LayerCapture(module)

    def __call__(self, loss_fn: PerExampleLoss, batch: Any) -> tuple[Tensor, Tensor]:
        """Accumulate the clipped gradient sum of `batch` into `p.grad`.

        Returns the per-example gradient norms before clipping and the
        per-example losses (both detached, Tensor[B]).
        """
        num_examples = batch_size_of(batch)
        if num_examples == 0:
            return torch.zeros(0), torch.zeros(0)
        params = list(trainable_parameters(self.module).values())
        with self.capture.recording() as calls, torch.enable_grad():
            losses = loss_fn(self.module, batch)
            layer_norms = StreamedNorms(calls, num_examples)
            # The graph is kept for the second backward below.
            stream_output_grads(losses, calls, lambda i, g: layer_norms.take(calls[i], g), retain_graph=True)
        norms = layer_norms.norms().to(losses.device)
        del calls, layer_norms
        factors = clip_factors(norms, self.max_grad_norm)
        with torch.enable_grad():
            # No cast of c_i to a bf16 loss dtype: rounding up could push a clipped norm past C.
            weighted = (factors.detach() * losses).sum()
        # autograd.grad w.r.t. this module's parameters only, not .backward():
        # other modules the loss touches (a discriminator, say) keep their .grad.
        grads = torch.autograd.grad(weighted, params, allow_unused=True) if params else ()
        for p, grad in zip(params, grads):
            if grad is not None:
                p.grad = grad if p.grad is None else p.grad + grad
        return norms.detach(), losses.detach()
