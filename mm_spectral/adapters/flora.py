"""FLoRA (Si et al., "Maintaining Structural Integrity in Parameter Spaces for PEFT").

ΔW = s · G ×₁ U₁ ×₂ U₂ … ×_N U_N: a Tucker core G with one mode per weight mode and one
factor per mode (2 for a linear weight, 4 for a conv weight (out, in/groups, kh, kw)).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..kernels.native import native_ops
from .base import LayerSpec, LowRankAdapter, check_positive, register_adapter
from .bias_cast import compute_bias
from .functional import eager_native, form_code, low_rank_linear, outside_autocast, scaled_mm
from .stash import take_stash


class _ConvTuckerDown(torch.autograd.Function):
    """scale · core ×₂ U₂ ×₃ U₃ ×₄ U₄ of a conv core, unfolded to (J₁, in · kh · kw).

    The contraction is one GEMM against the Kronecker product U₂ ⊗ U₃ ⊗ U₄ (built with two
    broadcast products); the backward is written out (two GEMMs and four small reductions),
    so autograd records one node where an einsum records a dozen permutes and bmms.
    """

    @staticmethod
    def forward(ctx, core, u_in, u_h, u_w, scale):  # type: ignore[override]
        (i, r_in), (h, r_h), (w, r_w) = u_in.shape, u_h.shape, u_w.shape
        # Broadcast views, not indexing with None: each None is one more dispatched op.
        spatial = (u_h.view(h, 1, r_h, 1) * u_w.view(1, w, 1, r_w)).view(h * w, r_h * r_w)
        kron = u_in.view(i, 1, r_in, 1) * spatial.view(1, h * w, 1, r_h * r_w)
        kron = kron.view(i * h * w, r_in * r_h * r_w)
        unfolded = core.view(core.shape[0], -1)
        down = torch.mm(unfolded, kron.t())
        ctx.save_for_backward(unfolded, u_in, u_h, u_w, spatial, kron)
        ctx.scale = scale
        return down if scale == 1.0 else down.mul_(scale)

    @staticmethod
    def backward(ctx, grad_down):  # type: ignore[override]
        unfolded, u_in, u_h, u_w, spatial, kron = ctx.saved_tensors
        (i, r_in), (h, r_h), (w, r_w) = u_in.shape, u_h.shape, u_w.shape
        g = grad_down.to(kron.dtype)  # bf16 when the forward GEMM ran under autocast
        g = g if ctx.scale == 1.0 else g * ctx.scale
        grad_core = torch.mm(g, kron).view(unfolded.shape[0], r_in, r_h, r_w)
        grad_kron = torch.mm(g.t(), unfolded).view(i, h * w, r_in, r_h * r_w)
        grad_in = (grad_kron * spatial.view(1, h * w, 1, r_h * r_w)).sum((1, 3))
        grad_spatial = (grad_kron * u_in.view(i, 1, r_in, 1)).sum((0, 2)).view(h, w, r_h, r_w)
        grad_h = (grad_spatial * u_w.view(1, w, 1, r_w)).sum((1, 3))
        grad_w = (grad_spatial * u_h.view(h, 1, r_h, 1)).sum((0, 2))
        return grad_core, grad_in, grad_h, grad_w, None


def conv_tucker_down(
    core: Tensor, factors: Sequence[Tensor], scale: float = 1.0, with_up: bool = False
) -> Tensor:
    """scale · core ×₂ factors[1] ×₃ factors[2] ×₄ factors[3] as (J₁, in/groups · kh · kw);
    ``with_up``: also ×₁ factors[0], i.e. ΔW as (out, in/groups · kh · kw). Float32, one
    C++ node in eager steps (:mod:`mm_spectral.kernels.native`), else the Python function."""
    if not torch.compiler.is_compiling():
        native = native_ops()
        if native is not None:
            up = factors[0] if with_up else None
            return native.tucker_conv_factor(core, *factors[1:], up, float(scale))
    device_type = core.device.type
    if torch.is_autocast_enabled(device_type):  # float32, as the C++ node
        return outside_autocast(device_type, conv_tucker_down, core, factors, scale, with_up)
    down = _ConvTuckerDown.apply(core, factors[1], factors[2], factors[3], float(scale))
    return torch.mm(factors[0], down) if with_up else down


@register_adapter
class FLoRA(LowRankAdapter):
    """N-mode Tucker adapter, ΔW = scale · core ×₁ factors[0] ×₂ … (mode-n products).

    Core sizes: ``rank`` on the channel modes, ``kernel_rank`` on the spatial modes, each
    clipped to its mode (a depthwise conv's in/groups = 1 gives 1). The core starts at zero
    and the factors at N(0, 1/(2 J_n)) — the official ``kaiming_normal_(a=√3)`` on (I_n, J_n)
    — so ΔW starts at zero while gradients reach the core.

    On linear and ungrouped conv layers ΔW is a rank-J₁ product: ``up = U₁`` (times s) and
    ``down = core ×₂ U₂ ×₃ U₃ ×₄ U₄`` viewed (J₁, fan_in), so training runs the factored
    path; grouped and depthwise convs build ΔW (small) once per forward.

    Args:
        spec: the adapted layer.
        rank: core size on the output and input channel modes.
        kernel_rank: core size on the two spatial modes of a conv (default 2).
        scale: s in the formula (the paper uses 4 for ConvNeXt, 0.04 for InternViT-6B).
    """

    method = "FLoRA"

    def __init__(
        self,
        spec: LayerSpec,
        rank: int = 8,
        kernel_rank: int = 2,
        scale: float = 1.0,
    ) -> None:
        super().__init__(spec)
        check_positive(spec, self.method, rank=rank, kernel_rank=kernel_rank)
        self.rank, self.kernel_rank, self.scale = rank, kernel_rank, scale
        mode_ranks = [rank, rank] + [kernel_rank] * (len(spec.weight_shape) - 2)
        core_shape = [min(r, size) for r, size in zip(mode_ranks, spec.weight_shape)]
        self.core = nn.Parameter(torch.zeros(core_shape))
        self.factors = nn.ParameterList(
            nn.Parameter(torch.randn(size, j) * (2 * j) ** -0.5)
            for size, j in zip(spec.weight_shape, core_shape)
        )

    def factor_tensors(self) -> tuple[Tensor, ...]:
        """U₁ … U_N. Read per layer and step, so from the list's own dict where they are
        registered: ``ParameterList.__getitem__`` (a string index and a getattr each) cost
        several times as much host time. (Inside an FSDP unit's forward they are plain
        attributes, which the list's own lookup finds.)"""
        factors = self._modules["factors"]
        params = factors._parameters
        if len(params) == len(self.spec.weight_shape):
            return tuple(params.values())
        return tuple(factors)

    def delta(self) -> Tensor:
        if len(self.spec.weight_shape) == 2:
            return super().delta()
        prebuilt = take_stash(self)  # from mm_spectral.enable_batched_spectra
        if prebuilt is not None:
            return prebuilt
        return conv_tucker_down(self.core, self.factors, self.scale, with_up=True)

    def low_rank_factors(self) -> tuple[Tensor, Tensor, float]:
        device_type = self.core.device.type
        if torch.is_autocast_enabled(device_type):
            # Weight-space products stay float32: under autocast they would cost two casts
            # forward and two backward per layer for GEMMs of a few thousand entries.
            return outside_autocast(device_type, self._low_rank_factors)
        return self._low_rank_factors()

    def _low_rank_factors(self) -> tuple[Tensor, Tensor, float]:
        factors = self.factor_tensors()
        if len(factors) == 2:  # linear: core ×₂ U₂ is a plain product
            u_out, u_in = factors
            # s · core U₂ᵀ, the scale in the GEMM's alpha: a scale left to the low-rank node
            # would cost two more ops on its gradients.
            return scaled_mm(self.core, u_in.t(), self.scale), u_out, 1.0
        # Conv: the scale goes into the (small) down factor, sparing an op on the up one.
        return conv_tucker_down(self.core, factors, self.scale), factors[0], 1.0

    def factored_forward(self, x: Tensor, layer: nn.Module, bias: Tensor | None) -> Tensor:
        """On a linear: the down factor from a batched build where one was planned
        (:func:`mm_spectral.enable_batched_spectra`), else in an eager step the core
        product inside the C++ node (:mod:`mm_spectral.kernels.native`); elsewhere as for
        every low-rank adapter."""
        if self.spec.kind == "linear":
            u_out, u_in = self.factor_tensors()
            down = take_stash(self)
            if down is not None:  # s · core U_inᵀ already
                return low_rank_linear(x, layer.weight, bias, down, u_out, 1.0)
            native = eager_native(x, layer.weight, u_out)
            if native is not None:
                form = form_code(x, layer.weight, u_out)
                return native.tucker_low_rank_linear(
                    x, layer.weight, compute_bias(bias, x), self.core, u_out, u_in, self.scale,
                    form,
                )  # fmt: skip
        return super().factored_forward(x, layer, bias)

    def size_warning(self) -> str | None:
        # Modes of size 1 (a depthwise conv's in/groups, a 1×1 kernel) clip by design.
        mode_ranks = [self.rank, self.rank] + [self.kernel_rank] * (len(self.spec.weight_shape) - 2)
        clipped = [
            f"{r} > {size}" for r, size in zip(mode_ranks, self.spec.weight_shape) if r > size > 1
        ]
        if not clipped:
            return None
        return (
            f"FLoRA core ranks clipped to the weight's modes {self.spec.weight_shape}: "
            f"{', '.join(clipped)} (core {tuple(self.core.shape)})"
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, core={tuple(self.core.shape)}, scale={self.scale:g}"
