"""FourierFT (Gao et al., "Parameter-Efficient Fine-Tuning with Discrete Fourier Transform",
ICML 2024): ΔW = α · Re(IDFT2(F)), F zero except n learnable coefficients at fixed entries.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..kernels.dispatch import OPTIONS
from .base import BaseAdapter, LayerSpec, check_positive, register_adapter
from .spectral import half_spectrum_positions, sample_entries, sparse_spectrum_to_real
from .stash import take_stash

FOURIERFT_INITS = ("gaussian", "zeros")


@register_adapter
class FourierFT(BaseAdapter):
    """ΔW = alpha · Re(torch.fft.ifft2(F)) over the weight's matrix view (out, fan_in).

    F is zero except ``F[indices] = coefficients``. ``indices`` are n distinct entries drawn
    with a generator seeded by ``seed`` (peft's draw, so layers of one shape share them),
    stored as a persistent buffer so a checkpoint restores them. ΔW has no factored form:
    the forward builds it once (float32 inverse real FFT) and runs one op with W0 + ΔW.

    Args:
        spec: the adapted layer.
        n: number of learnable spectral coefficients.
        alpha: scale α (peft's default 150; task-sensitive, keep it in the config).
        seed: seed of the entry draw.
        fc, bandwidth: optional frequency bias (paper Eq. 5): draw the n entries without
            replacement with probability ∝ exp(−((D² − fc²) / (D · bandwidth))²), D the
            entry's distance from the centre of the shifted spectrum.
        init: 'gaussian' (paper, N(0, 1) coefficients) or 'zeros' (ΔW starts at zero).
    """

    method = "FourierFT"
    fixed_buffers = ("indices",)

    def __init__(
        self,
        spec: LayerSpec,
        n: int = 1000,
        alpha: float = 150.0,
        seed: int = 777,
        fc: float | None = None,
        bandwidth: float | None = None,
        init: str = "gaussian",
    ) -> None:
        super().__init__(spec)
        check_positive(spec, self.method, n=n)
        rows, cols = spec.matrix_shape
        if n > rows * cols:
            raise ValueError(
                f"FourierFT on layer '{spec.name}': n={n} exceeds the {rows}x{cols} "
                f"weight's {rows * cols} entries"
            )
        if init not in FOURIERFT_INITS:
            raise ValueError(
                f"FourierFT on layer '{spec.name}': init must be one of {FOURIERFT_INITS}, "
                f"got {init!r}"
            )
        self.n, self.alpha, self.seed = n, alpha, seed
        self.register_buffer("indices", sample_entries(rows, cols, n, seed, fc, bandwidth))
        coefficients = torch.randn(n) if init == "gaussian" else torch.zeros(n)
        self.coefficients = nn.Parameter(coefficients)
        self.register_buffer("positions", torch.empty(0, dtype=torch.long), persistent=False)
        self.refresh_buffers()

    def refresh_buffers(self) -> None:
        self.positions = half_spectrum_positions(self.indices, self.spec.matrix_shape)

    def delta(self) -> Tensor:
        prebuilt = take_stash(self)  # from mm_spectral.enable_batched_spectra
        if prebuilt is not None:
            return prebuilt
        # α is applied to the n coefficients rather than to the dense result.
        return sparse_spectrum_to_real(
            self.coefficients, self.positions, self.spec.matrix_shape, self.alpha
        )

    def forward(self, x: Tensor, layer: nn.Module) -> Tensor:
        sampled = OPTIONS.fourier_grad == "sampled" and not torch.compiler.is_compiling()
        if self.spec.kind == "linear" and sampled:
            from .fourier_linear import spectral_delta_linear

            return spectral_delta_linear(
                x, layer.weight, layer.bias, self.coefficients, self.positions, self.indices,
                self.alpha,
            )  # fmt: skip
        return super().forward(x, layer)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, n={self.n}, alpha={self.alpha:g}, seed={self.seed}"
