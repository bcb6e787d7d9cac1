"""Per-example parameter gradients of one layer from its input and output gradient.

Each function gets the layer, its input activations A and the gradient G of the
summed per-example loss w.r.t. its output, both with n = B*K rows ordered
example-major (row i*K + k is draw k of example i), the number of examples B,
and optionally the layer's output itself (whose autograd node may hold what the
forward computed, e.g. GroupNorm's statistics), and returns
{param: Tensor[B, *param.shape]}: the K draws of an example are summed inside
the contraction, so memory is B x params whatever K is (noise multiplicity).

Why by hand: Opacus's grad samplers produce one gradient per forward row (and
pre-allocate B*K rows), and its conv sampler uses unfold + einsum; the native
conv weight-gradient kernel run with groups=B is several times faster on CPU
(see DESIGN.md, Performance).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

GradSampler = Callable[[nn.Module, Tensor, Tensor, int, Tensor | None], dict[nn.Parameter, Tensor]]


def _fold(t: Tensor, num_examples: int) -> Tensor:
    """(B*K, ...) -> (B, K, ...)."""
    return t.reshape(num_examples, -1, *t.shape[1:])


def linear_grads(layer: nn.Linear, a: Tensor, g: Tensor, num_examples: int,
                 output: Tensor | None = None) -> dict[nn.Parameter, Tensor]:
    a = a.reshape(num_examples, -1, a.shape[-1])
    g = g.reshape(num_examples, -1, g.shape[-1])
    out = {}
    if layer.weight.requires_grad:
        out[layer.weight] = torch.einsum("bso,bsi->boi", g, a)
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = g.sum(dim=1)
    return out


def _examples_as_channels(t: Tensor, num_examples: int) -> Tensor:
    """(B*K, C, H, W) -> (K, B*C, H, W): draw k of every example in batch row k."""
    if t.shape[0] == num_examples:  # K=1: a view, one op (this runs ~70 times a step)
        return t.reshape(1, -1, *t.shape[2:])
    return _fold(t, num_examples).transpose(0, 1).reshape(-1, num_examples * t.shape[1], *t.shape[2:])


def _is_pointwise(layer: nn.Conv2d) -> bool:
    return (layer.kernel_size == (1, 1) and layer.stride == (1, 1) and layer.padding == (0, 0)
            and layer.groups == 1)


def _is_narrow(layer: nn.Conv2d, rows: int, num_examples: int) -> bool:
    """Few output channels or one input channel (a UNet's first and last conv), one draw per example."""
    return (rows == num_examples and layer.stride == (1, 1) and layer.dilation == (1, 1) and layer.groups == 1
            and (layer.out_channels <= 3 or layer.in_channels == 1))


def _narrow_conv_weight_grads(layer: nn.Conv2d, a: Tensor, g: Tensor) -> Tensor:
    """Per-example weight gradients of a stride-1 conv, one batched matmul per kernel offset.

    Why: with groups=B and one or three channels per group the native kernel is
    3-6x slower than this (32->1 channels at 28x28, B=64: 0.85 against 4.8 ms).
    The input is zero-padded and flattened row by row; the output gradient is
    laid on the same padded-row grid (zeros in the extra columns), so the window
    of kernel offset (i, j) is one contiguous slice starting at i * row + j.
    """
    num_examples, c_in, _, width = a.shape
    h_out, w_out = g.shape[2:]
    (kh, kw), (ph, pw) = layer.kernel_size, layer.padding
    row = width + 2 * pw
    x = F.pad(F.pad(a, (pw, pw, ph, ph)).flatten(2), (0, kw - 1))
    gp = F.pad(g, (0, row - w_out)).flatten(2)
    out = a.new_empty(kh, kw, num_examples, layer.out_channels, c_in)
    for i in range(kh):
        for j in range(kw):
            start = i * row + j
            torch.bmm(gp, x[:, :, start:start + h_out * row].transpose(1, 2), out=out[i, j])
    return out.permute(2, 3, 4, 0, 1).contiguous()


def conv2d_grads(layer: nn.Conv2d, a: Tensor, g: Tensor, num_examples: int,
                 output: Tensor | None = None) -> dict[nn.Parameter, Tensor]:
    if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
        raise NotImplementedError("grouped per-example conv gradients need integer zero padding")
    b = num_examples
    want_weight = layer.weight.requires_grad
    want_bias = layer.bias is not None and layer.bias.requires_grad
    out = {}
    if want_weight and _is_narrow(layer, a.shape[0], b):
        out[layer.weight] = _narrow_conv_weight_grads(layer, a, g)
        if want_bias:
            out[layer.bias] = g.sum(dim=(2, 3))
        return out
    if want_weight and _is_pointwise(layer):
        # A 1x1 conv is a Linear layer over positions: one batched matrix product
        # (a little faster than the grouped kernel for every 1x1 shape of the DPDM UNet).
        a3 = _fold(a, b).transpose(1, 2).reshape(b, a.shape[1], -1)
        g3 = _fold(g, b).transpose(1, 2).reshape(b, g.shape[1], -1)
        out[layer.weight] = torch.bmm(g3, a3.transpose(1, 2)).reshape(b, *layer.weight.shape)
        if want_bias:
            out[layer.bias] = g3.sum(dim=2)
        return out
    if want_weight:
        # Fold examples into channels, draws into the batch: one grouped
        # weight-gradient call sums the K draws and keeps examples apart, and its
        # bias gradient (per group channel, summed over draws and positions) is
        # the per-example bias gradient, from the same pass over g.
        a_g, g_g = _examples_as_channels(a, b), _examples_as_channels(g, b)
        weight_shape = (b * layer.out_channels, *layer.weight.shape[1:])
        # The kernel reads only the weight's shape and layout. An expanded 1-element tensor
        # (what torch.nn.grad.conv2d_weight passes) makes it clone its result to be contiguous:
        # 0.4-0.6 ms per 64-channel layer at B=64. An uninitialised dense tensor does not.
        _, weight, bias = torch.ops.aten.convolution_backward(
            g_g, a_g, g_g.new_empty(weight_shape), [weight_shape[0]] if want_bias else None,
            layer.stride, layer.padding, layer.dilation, False, [0, 0], b * layer.groups,
            [False, True, want_bias])
        out[layer.weight] = weight.reshape(b, *layer.weight.shape)
        if want_bias:
            out[layer.bias] = bias.reshape(b, layer.out_channels)
    elif want_bias:
        out[layer.bias] = _fold(g, b).sum(dim=(1, 3, 4))
    return out


def saved_group_norm_statistics(output: Tensor | None, rows: int, groups: int,
                                dtype: torch.dtype) -> tuple[Tensor, Tensor] | None:
    """The per-(row, group) mean and 1/std the forward saved for the backward, if `output` has them."""
    node = getattr(output, "grad_fn", None)
    if node is None or type(node).__name__ != "NativeGroupNormBackward0":
        return None
    mean, rstd = node._saved_result1, node._saved_result2
    if mean.shape != (rows, groups) or mean.dtype not in (dtype, torch.float32):
        return None
    return mean.reshape(1, -1), rstd.reshape(1, -1)


def group_norm_grads(layer: nn.GroupNorm, a: Tensor, g: Tensor, num_examples: int,
                     output: Tensor | None = None) -> dict[nn.Parameter, Tensor]:
    # Every row's channels become channels of ONE example (n*C channels, n*G groups:
    # the same statistics), so the native backward kernel's per-channel sums
    # (sum of x_hat*g and of g, in one fused pass) are the per-row gradients.
    # The statistics are the forward's where its autograd node kept them.
    rows, channels = a.shape[:2]
    spatial = math.prod(a.shape[2:])
    groups = rows * layer.num_groups
    a1, g1 = a.reshape(1, rows * channels, spatial), g.reshape(1, rows * channels, spatial)
    want_weight = layer.weight is not None and layer.weight.requires_grad
    want_bias = layer.bias is not None and layer.bias.requires_grad
    saved = saved_group_norm_statistics(output, rows, layer.num_groups, a.dtype)
    if saved is None:
        _, mean, rstd = torch.ops.aten.native_group_norm(a1, None, None, 1, rows * channels, spatial, groups,
                                                         layer.eps)
    else:
        mean, rstd = saved
    _, weight, bias = torch.ops.aten.native_group_norm_backward(
        g1, a1, mean, rstd, None, 1, rows * channels, spatial, groups, [False, want_weight, want_bias])
    out = {}
    if want_weight:
        out[layer.weight] = _fold(weight.reshape(rows, channels), num_examples).sum(dim=1)
    if want_bias:
        out[layer.bias] = _fold(bias.reshape(rows, channels), num_examples).sum(dim=1)
    return out


def layer_norm_grads(layer: nn.LayerNorm, a: Tensor, g: Tensor, num_examples: int,
                     output: Tensor | None = None) -> dict[nn.Parameter, Tensor]:
    # Rows are B*K example-major with any further leading dims (tokens) before the normalized
    # ones: an example's gradient sums x_hat * g (weight) and g (bias) over its draws and tokens.
    # Opacus's sampler forms one gradient per row (B*K x params) and sums K afterwards.
    shape = tuple(layer.normalized_shape)
    want_weight = layer.weight is not None and layer.weight.requires_grad
    want_bias = layer.bias is not None and layer.bias.requires_grad
    g = g.reshape(num_examples, -1, *shape)
    out = {}
    if want_weight:
        x_hat = F.layer_norm(a, shape, None, None, layer.eps).reshape(num_examples, -1, *shape)
        out[layer.weight] = (x_hat * g).sum(dim=1)
    if want_bias:
        out[layer.bias] = g.sum(dim=1)
    return out


def embedding_grads(layer: nn.Embedding, a: Tensor, g: Tensor, num_examples: int,
                    output: Tensor | None = None) -> dict[nn.Parameter, Tensor]:
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
    nn.LayerNorm: layer_norm_grads,
    nn.Embedding: embedding_grads,
}


def unsupported_parameters(module: nn.Module) -> list[str]:
    """Names of trainable parameters that are not a plain `weight` or `bias` of a layer type with a sampler here.

    A parametrised layer (`torch.nn.utils.parametrizations.weight_norm`, or the old `weight_norm`'s
    `weight_g`/`weight_v`, from which a forward pre-hook computes `weight`) is refused: its sampler would
    give the gradient of the computed `weight`, not of the parameters the optimizer updates.
    """
    names = []
    for layer_name, layer in module.named_modules():
        plain = type(layer) in GRAD_SAMPLERS
        for name, p in layer.named_parameters(recurse=False):
            if p.requires_grad and not (plain and any(getattr(layer, attr, None) is p for attr in ("weight", "bias"))):
                names.append(f"{layer_name}.{name}" if layer_name else name)
    return names


def supports(module: nn.Module) -> bool:
    """Whether every trainable parameter is a plain weight or bias of a layer type with a sampler here."""
    return not unsupported_parameters(module)
