"""Per-example parameter gradients of one layer from its input and output gradient.

Each function gets the layer, its input activations A and the gradient G of the
summed per-example loss w.r.t. its output, both with n = B*K rows ordered
example-major (row i*K + k is draw k of example i), and returns
{param: Tensor[B, *param.shape]}: the K draws of an example are summed inside
the contraction, so memory is B x params whatever K is (noise multiplicity).

Why by hand: Opacus's grad samplers produce one gradient per forward row (and
pre-allocate B*K rows), and its conv sampler uses unfold + einsum; the native
conv weight-gradient kernel run with groups=B is several times faster on CPU
(see DESIGN.md, Performance).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

GradSampler = Callable[[nn.Module, Tensor, Tensor, int], dict[nn.Parameter, Tensor]]


def _fold(t: Tensor, num_examples: int) -> Tensor:
    """(B*K, ...) -> (B, K, ...)."""
    return t.reshape(num_examples, -1, *t.shape[1:])


def linear_grads(layer: nn.Linear, a: Tensor, g: Tensor, num_examples: int) -> dict[nn.Parameter, Tensor]:
    a = a.reshape(num_examples, -1, a.shape[-1])
    g = g.reshape(num_examples, -1, g.shape[-1])
    out = {}
    if layer.weight.requires_grad:
        out[layer.weight] = torch.einsum("bso,bsi->boi", g, a)
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = g.sum(dim=1)
    return out


def conv2d_grads(layer: nn.Conv2d, a: Tensor, g: Tensor, num_examples: int) -> dict[nn.Parameter, Tensor]:
    if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
        raise NotImplementedError("grouped per-example conv gradients need integer zero padding")
    b = num_examples
    out = {}
    if layer.weight.requires_grad:
        # Fold examples into channels, draws into the batch: one grouped
        # weight-gradient call sums the K draws and keeps examples apart.
        a_g = _fold(a, b).transpose(0, 1).reshape(-1, b * a.shape[1], *a.shape[2:])
        g_g = _fold(g, b).transpose(0, 1).reshape(-1, b * g.shape[1], *g.shape[2:])
        weight = torch.nn.grad.conv2d_weight(
            a_g,
            (b * layer.out_channels, *layer.weight.shape[1:]),
            g_g,
            stride=layer.stride,
            padding=layer.padding,
            dilation=layer.dilation,
            groups=b * layer.groups,
        )
        out[layer.weight] = weight.reshape(b, *layer.weight.shape)
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = _fold(g, b).sum(dim=(1, 3, 4))
    return out


def group_norm_grads(layer: nn.GroupNorm, a: Tensor, g: Tensor, num_examples: int) -> dict[nn.Parameter, Tensor]:
    # Every row's channels become channels of ONE example (n*C channels, n*G groups:
    # the same statistics), so the native backward kernel's per-channel sums
    # (sum of x_hat*g and of g, in one fused pass) are the per-row gradients.
    rows, channels = a.shape[:2]
    spatial = a[0, 0].numel()
    groups = rows * layer.num_groups
    a1, g1 = a.reshape(1, rows * channels, spatial), g.reshape(1, rows * channels, spatial)
    want_weight = layer.weight is not None and layer.weight.requires_grad
    want_bias = layer.bias is not None and layer.bias.requires_grad
    _, mean, rstd = torch.ops.aten.native_group_norm(a1, None, None, 1, rows * channels, spatial, groups, layer.eps)
    _, weight, bias = torch.ops.aten.native_group_norm_backward(
        g1, a1, mean, rstd, None, 1, rows * channels, spatial, groups, [False, want_weight, want_bias])
    out = {}
    if want_weight:
        out[layer.weight] = _fold(weight.reshape(rows, channels), num_examples).sum(dim=1)
    if want_bias:
        out[layer.bias] = _fold(bias.reshape(rows, channels), num_examples).sum(dim=1)
    return out


def embedding_grads(layer: nn.Embedding, a: Tensor, g: Tensor, num_examples: int) -> dict[nn.Parameter, Tensor]:
    if not layer.weight.requires_grad:
        return {}
    rows, dim = layer.weight.shape
    index = a.reshape(num_examples, -1)
    example = torch.arange(num_examples, device=a.device).unsqueeze(1).expand_as(index)
    flat = torch.zeros(num_examples * rows, dim, dtype=g.dtype, device=g.device)
    flat.index_add_(0, (example * rows + index).reshape(-1), g.reshape(-1, dim))
    return {layer.weight: flat.reshape(num_examples, rows, dim)}


GRAD_SAMPLERS: dict[type[nn.Module], GradSampler] = {
    nn.Linear: linear_grads,
    nn.Conv2d: conv2d_grads,
    nn.GroupNorm: group_norm_grads,
    nn.Embedding: embedding_grads,
}


def supports(module: nn.Module) -> bool:
    """Whether every trainable parameter sits directly in a layer type with a sampler here."""
    for layer in module.modules():
        own = [p for p in layer.parameters(recurse=False) if p.requires_grad]
        if own and type(layer) not in GRAD_SAMPLERS:
            return False
    return True
