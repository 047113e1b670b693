"""Many same-shape sparse-spectrum inverse FFTs as one batched ``irfft2`` (pure torch).

A ViT-L has 24 blocks whose FourierFT layers share four shapes; building each ΔW costs a
handful of small launches (zero-fill, two scatters, an inverse FFT; in the backward a
forward FFT and a gather), so the per-layer builds are host-bound on a fast GPU. Here all
layers of one shape go through one scatter and one ``irfft2`` over a (layers, rows, cols)
batch, and one ``rfft2`` plus one gather in the backward.

- :func:`batched_sparse_spectrum_to_real` — the batched form of
  :func:`mm_spectral.adapters.spectral.sparse_spectrum_to_real` (same values, gradients);
- :func:`batched_fourierft_deltas`, :func:`batched_fora_factors` — every adapter's
  ``delta()`` / ``low_rank_factors()`` for a list of same-shape adapters;
- :func:`enable_batched_spectra` — opt-in: a forward pre-hook that builds all of a model's
  spectral ΔW / factors batched before each forward and hands each adapter its own.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .base import is_adapted
from .fora import FoRA
from .fourierft import FourierFT
from .stash import stash


def _layer_slots(rows: int, cols: int) -> int:
    """Float slots of one layer's half spectrum plus its spare complex slot (as the
    single-layer scatter lays it out)."""
    return 2 * (rows * (cols // 2 + 1) + 1)


class _BatchedSparseSpectrumToReal(torch.autograd.Function):
    """Forward: one scatter into all layers' half spectra, one batched ``irfft2``.

    Backward: one batched ``rfft2`` of the gradients, one gather (cf. the single-layer
    ``_SparseSpectrumToReal``: ∂/∂c = scale · Re(fft2(g))[entry] / (rows · cols)).
    """

    @staticmethod
    def forward(ctx, shape, slots, scales, *coefficients):  # type: ignore[override]
        own, mirror, gather = slots
        rows, cols = shape
        layers = len(coefficients)
        device = coefficients[0].device
        sizes = [c.numel() for c in coefficients]
        values = torch.cat([c.float().reshape(-1) for c in coefficients])
        if len(set(scales)) == 1:
            per_entry: Tensor | float = scales[0]
        else:  # repeat_interleave with output_size: no device sync
            per_entry = torch.repeat_interleave(
                torch.tensor(scales, device=device),
                torch.tensor(sizes, device=device),
                output_size=values.numel(),
            )
        # Each coefficient gives half of itself (times its layer's scale) to its own slot
        # and half to its mirror's, as in the single-layer build.
        values = values * per_entry * 0.5
        flat = torch.zeros(layers * _layer_slots(rows, cols), device=device)
        flat.index_add_(0, own, values)
        flat.index_add_(0, mirror, values)
        spectra = torch.view_as_complex(flat.view(layers, -1, 2)[:, :-1])
        ctx.save_for_backward(gather)
        ctx.per_entry = per_entry
        ctx.shape, ctx.sizes = shape, sizes
        ctx.dtypes = [c.dtype for c in coefficients]
        return torch.fft.irfft2(spectra.view(layers, rows, cols // 2 + 1), s=shape)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        (gather,) = ctx.saved_tensors
        rows, cols = ctx.shape
        spectrum = torch.view_as_real(torch.fft.rfft2(grad_out.float()))
        grads = torch.take(spectrum, gather).mul_(ctx.per_entry).div_(rows * cols)
        parts = grads.split(ctx.sizes)
        return (None, None, None, *(p.to(d) for p, d in zip(parts, ctx.dtypes)))


def batched_positions(
    positions: Sequence[Tensor], shape: tuple[int, int]
) -> tuple[Tensor, Tensor, Tensor]:
    """Scatter and gather slots of several layers in the batched layout.

    Args:
        positions: each layer's :func:`~mm_spectral.adapters.spectral.half_spectrum_positions`.
        shape: the common (rows, cols).

    Returns:
        (own, mirror, gather): flat float slots of all layers' entries, concatenated; the
        scatter slots index one (layers, rows·(cols//2+1) + 1, 2) buffer, the gather slots
        the (layers, rows, cols//2+1, 2) real view of a batched ``rfft2``.
    """
    rows, cols = shape
    scatter_stride = _layer_slots(rows, cols)
    gather_stride = 2 * rows * (cols // 2 + 1)
    own, mirror, gather = [], [], []
    for layer, pos in enumerate(positions):
        n = pos.numel() // 3
        own.append(pos[:n] + layer * scatter_stride)
        mirror.append(pos[n : 2 * n] + layer * scatter_stride)
        gather.append(pos[2 * n :] + layer * gather_stride)
    return torch.cat(own), torch.cat(mirror), torch.cat(gather)


def batched_sparse_spectrum_to_real(
    coefficients: Sequence[Tensor],
    positions: Sequence[Tensor],
    shape: tuple[int, int],
    scales: Sequence[float],
    slots: tuple[Tensor, Tensor, Tensor] | None = None,
) -> Tensor:
    """(layers, rows, cols) float32: layer ℓ is ``sparse_spectrum_to_real(coefficients[ℓ],
    positions[ℓ], shape, scales[ℓ])``, all from one batched inverse real FFT.

    ``slots``: the :func:`batched_positions` of ``positions``, when precomputed (a batch
    built every step); ``positions`` is then not read.
    """
    if not coefficients:
        raise ValueError("batched_sparse_spectrum_to_real needs at least one layer")
    if len(scales) != len(coefficients):
        raise ValueError(f"{len(coefficients)} layers but {len(scales)} scales")
    if slots is None:
        slots = batched_positions(positions, shape)
    scales = tuple(float(s) for s in scales)
    return _BatchedSparseSpectrumToReal.apply(tuple(shape), slots, scales, *coefficients)


def batched_fourierft_deltas(adapters: Sequence[FourierFT]) -> list[Tensor]:
    """Each adapter's ``delta()`` (float32, its weight's matrix shape) from one batched build."""
    shape = adapters[0].spec.matrix_shape
    if any(a.spec.matrix_shape != shape for a in adapters):
        raise ValueError("batched_fourierft_deltas: the adapters' weights differ in shape")
    deltas = batched_sparse_spectrum_to_real(
        [a.coefficients for a in adapters],
        [a.positions for a in adapters],
        shape,
        [a.alpha for a in adapters],
    )
    return list(deltas.unbind(0))


def batched_fora_factors(adapters: Sequence[FoRA]) -> list[tuple[Tensor, Tensor, float]]:
    """Each adapter's ``low_rank_factors()`` (down, up, scale) from two batched builds."""
    a_shape, b_shape = adapters[0].a_shape, adapters[0].b_shape
    if any((a.a_shape, a.b_shape) != (a_shape, b_shape) for a in adapters):
        raise ValueError("batched_fora_factors: the adapters' factors differ in shape")
    ones = [1.0] * len(adapters)
    downs = batched_sparse_spectrum_to_real(
        [a.a_coefficients for a in adapters], [a.a_positions for a in adapters], a_shape, ones
    )
    ups = batched_sparse_spectrum_to_real(
        [a.b_coefficients for a in adapters], [a.b_positions for a in adapters], b_shape, ones
    )
    return [(d, u, a.scale) for d, u, a in zip(downs.unbind(0), ups.unbind(0), adapters)]


# --- opt-in use in the forward -------------------------------------------------------------


def _groups(model: nn.Module) -> list[tuple[str, list[nn.Module]]]:
    """Unmerged FourierFT / FoRA adapters of ``model`` grouped by shape (groups of ≥ 2)."""
    groups: dict[tuple, list[nn.Module]] = defaultdict(list)
    for layer in model.modules():
        if not is_adapted(layer) or layer.merged:
            continue
        adapter = layer.adapter
        if isinstance(adapter, FourierFT):
            groups[("FourierFT", adapter.spec.matrix_shape)].append(adapter)
        elif isinstance(adapter, FoRA):
            groups[("FoRA", adapter.a_shape, adapter.b_shape)].append(adapter)
    return [(key[0], members) for key, members in groups.items() if len(members) > 1]


def build_batched_spectra(model: nn.Module) -> int:
    """Build every spectral ΔW (FourierFT) and factor pair (FoRA) of ``model`` in one
    batched call per shape and stash each in its adapter; returns the layers built."""
    built = 0
    for kind, members in _groups(model):
        if kind == "FourierFT":
            results: list[Any] = batched_fourierft_deltas(members)
        else:
            results = batched_fora_factors(members)
        for adapter, result in zip(members, results):
            stash(adapter, result)
        built += len(members)
    return built


def enable_batched_spectra(model: nn.Module) -> RemovableHandle:
    """Opt-in: before each ``model(...)`` call, build its spectral adapters batched.

    Each FourierFT/FoRA adapter then takes its prebuilt ΔW / factors in its forward
    instead of building them itself (merged layers and adapters whose parameters changed
    since ignore them). Returns the hook's handle; ``handle.remove()`` turns it off.
    """

    def pre_hook(module: nn.Module, args: Any) -> None:
        build_batched_spectra(module)

    return model.register_forward_pre_hook(pre_hook)
