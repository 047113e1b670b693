"""Every method's weight and bias after merging, by the papers' formulas, in float64.

Written independently of the implementation (einsum, explicit cosine sums, the DoRA
formula): tests compare ΔW, merged weights, forwards and gradients against these.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def explicit_real_idft2(coefficients: Tensor, indices: Tensor, shape) -> Tensor:
    """Re(IDFT2) of a sparse real spectrum as the explicit sum of cosines, float64."""
    rows, cols = shape
    x = torch.arange(rows, dtype=torch.float64)[:, None, None]
    y = torch.arange(cols, dtype=torch.float64)[None, :, None]
    u, v = indices[0].double(), indices[1].double()
    phase = 2 * math.pi * (u * x / rows + v * y / cols)
    return (coefficients.double() * torch.cos(phase)).sum(-1) / (rows * cols)


def reference_delta(adapter) -> Tensor:
    """ΔW of an additive method (DoRA: its LoRA update) from its parameters, float64."""
    shape = adapter.spec.weight_shape
    rows = shape[0]
    cols = math.prod(shape[1:])
    method = adapter.method
    if method in ("LoRA", "DoRA"):
        # Both conv parameterisations: loralib's ΔW is (B A).view(weight shape).
        delta = adapter.scale * adapter.lora_B.double() @ adapter.lora_A.double()
    elif method == "FLoRA":
        f = [p.double() for p in adapter.factors]
        core = adapter.core.double()
        if len(shape) == 2:
            delta = torch.einsum("ab,ia,jb->ij", core, f[0], f[1])
        else:
            delta = torch.einsum("abcd,ia,jb,kc,ld->ijkl", core, *f)
        delta = adapter.scale * delta
    elif method == "FourierFT":
        delta = adapter.alpha * explicit_real_idft2(
            adapter.coefficients, adapter.indices, (rows, cols)
        )
    elif method == "FoRA":
        a = explicit_real_idft2(adapter.a_coefficients, adapter.a_indices, adapter.a_shape)
        b = explicit_real_idft2(adapter.b_coefficients, adapter.b_indices, adapter.b_shape)
        delta = adapter.scale * b @ a
    elif method == "BitFit":
        delta = torch.zeros(shape, dtype=torch.float64)
    else:  # pragma: no cover - the matrix names every method
        raise AssertionError(method)
    return delta.reshape(shape)


def reference_merged(
    adapter, weight: Tensor, bias: Tensor | None, detach_norm: bool = False
) -> tuple[Tensor, Tensor | None]:
    """(W', b') in float64 for base weight and bias (W0, b0).

    DoRA (Liu et al. 2024, Eq. 5): W' = m · V / ‖V‖_c, V = W0 + ΔW, the norm per output
    channel over all other axes; ``detach_norm`` drops its gradient (paper §4.3).
    BitFit: b' = b0 + Δb. Row blocks: each used block's rows by its own adapter.
    """
    weight = weight.double()
    bias = None if bias is None else bias.double()
    if hasattr(adapter, "blocks"):  # row blocks of one Linear
        rows = weight.shape[0] // adapter.split
        weights, biases = [], []
        for i in range(adapter.split):
            part = slice(i * rows, (i + 1) * rows)
            w, b = weight[part], None if bias is None else bias[part]
            if i in adapter.use:
                w, b = reference_merged(adapter.blocks[str(i)], w, b, detach_norm)
            weights.append(w)
            biases.append(b)
        return torch.cat(weights), None if bias is None else torch.cat(biases)
    if adapter.method == "BitFit":
        return weight, bias + adapter.bias_delta.double()
    direction = weight + reference_delta(adapter)
    if adapter.method != "DoRA":
        return direction, bias
    norm = torch.sqrt((direction**2).sum(dim=tuple(range(1, direction.dim()))))
    norm = norm.detach() if detach_norm else norm
    shape = (-1,) + (1,) * (direction.dim() - 1)
    return adapter.magnitude.double().view(shape) * direction / norm.view(shape), bias


def reference_layer(layer, detach_norm: bool = False) -> tuple[Tensor, Tensor | None]:
    """(W', b') of an adapted (unmerged) layer, float64."""
    return reference_merged(layer.adapter, layer.weight, layer.bias, detach_norm)
