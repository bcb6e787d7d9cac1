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
     A norm layer (GroupNorm, LayerNorm) always takes this path: its per-example
     gradient (2 x channels) is smaller than any Gram matrix of its rows.
   A layer or parameter used more than once in the forward has per-example
   gradients that are sums over its calls; those are materialised and summed
   before the norm (ghost norms of the calls would not add up).
3. Clip factors c_i = min(1, C / (||g_i|| + 1e-6)), and a second backward of
   sum_i c_i L_i on the retained graph gives sum_i c_i g_i: the clipped sum.

Noise multiplicity needs nothing extra: the loss of example i already averages
its K draws, and the K draws' rows are among its S rows above.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from dp_diffusion.privacy.clipping import clip_factors
from dp_diffusion.privacy.per_example import (
    CapturedCall,
    LayerCapture,
    NormsOnTheWay,
    PerExampleLoss,
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


def ghost_norm_applies(call: CapturedCall, num_examples: int, shared: set[nn.Parameter]) -> bool:
    """Whether a call's norm part is taken by the ghost norm: a Linear layer used once, where cheaper."""
    layer = call.layer
    if type(layer) is not nn.Linear or any(p in shared for p in call.params):
        return False
    return ghost_norm_is_cheaper(layer, call.activations.numel() // (num_examples * layer.in_features))


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
        with self.capture.recording(num_examples) as calls, torch.enable_grad():
            losses = loss_fn(self.module, batch)
            # Materialised norm parts free each layer's per-example gradients once its norm is in.
            layer_norms = NormsOnTheWay(calls, num_examples, keep=False)
            shared = {p for p, uses in parameter_uses(calls).items() if uses > 1}

            def take(index: int, out_grad: Tensor) -> None:
                call = calls[index]
                if ghost_norm_applies(call, num_examples, shared):
                    a, g = layer_call_inputs(call, out_grad)
                    layer_norms.add_squared(linear_ghost_sq_norms(call.layer, a, g, num_examples))
                else:
                    layer_norms.add(call, out_grad)

            # The graph is kept for the second backward below.
            stream_output_grads(losses, calls, take, retain_graph=True)
        # <G G^T, A A^T> >= 0 exactly, but rounding can leave a tiny negative.
        norms = layer_norms.squared(losses.device).clamp(min=0).sqrt()
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
