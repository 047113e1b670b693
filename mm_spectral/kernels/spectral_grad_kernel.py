"""FourierFT's coefficient gradient as one fused kernel: row DFTs in registers, never stored.

∂L/∂cⱼ = α/(o·i) · Re Σₜ FG[t, kⱼ] FX[t, lⱼ] (derivation in ``spectral_grad``). Computing
FG and FX with cuFFT writes two complex64 spectra (T × o and T × i, 2× the float32 size of
g and x) and reads them back for the n × T sampled product; the dense route's gᵀx GEMM is
cheaper than that traffic. This kernel keeps one token's spectra in registers:

- each row of length L = L1·L2 (L2 a power of two ≤ 64 dividing L) is transformed by the
  four-step DFT, V (L1 × L2, the row reshaped) → D_L1 V → twiddle → · D_L2, i.e. two small
  tensor-core GEMMs against cosine/sine tables (bf16, or TF32 with ``bf16=False``);
- the n sampled entries of both spectra are gathered from registers (``tl.gather``) and
  their products accumulated over the program's tokens; one float32 partial per program
  is written and summed.

The DFT-by-GEMM costs ~6·(L1 + L2)·L real multiply-adds per row — for o = 4096 about a
tenth of the 2·o·i per row of the dense gᵀx — but runs as many small dots.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from .tiles import INTERPRET

MAX_PAIRS_BLOCK = 4096  # sampled entries per program (registers); more run as a 2nd grid axis


def four_step_plan(size: int) -> tuple[int, int, int] | None:
    """(L1, P1, L2) with size = L1·L2, L2 a power of two in [16, 64], P1 = L1 padded to a
    power of two ≥ 16; None where the kernel cannot transform rows of this length."""
    l2 = 64
    while l2 >= 16 and size % l2:
        l2 //= 2
    if l2 < 16:
        return None
    l1 = size // l2
    p1 = max(16, triton.next_power_of_2(l1))
    return (l1, p1, l2) if p1 <= 128 else None


@functools.lru_cache(maxsize=32)
def _dft_tables(size: int, device: torch.device) -> Tensor:
    """cos/sin tables of the four-step DFT of length ``size``, packed in one float32 buffer.

    Layout: C1, S1 (P1 × P1: cos, sin 2π a k1 / L1, zero outside L1 × L1), Tc, Ts (L2 × P1:
    the twiddles cos, sin 2π b k1 / L), C2, S2 (L2 × L2: cos, sin 2π b k2 / L2).
    """
    l1, p1, l2 = four_step_plan(size)
    a = torch.arange(p1, dtype=torch.float64)
    b = torch.arange(l2, dtype=torch.float64)
    inside = (a[:, None] < l1) & (a[None, :] < l1)
    angle1 = 2 * math.pi * torch.outer(a, a) / l1
    twiddle = 2 * math.pi * torch.outer(b, a) / size
    twiddle_inside = (a < l1)[None, :]
    angle2 = 2 * math.pi * torch.outer(b, b) / l2
    parts = [
        torch.where(inside, angle1.cos(), 0.0),
        torch.where(inside, angle1.sin(), 0.0),
        torch.where(twiddle_inside, twiddle.cos(), 0.0),
        torch.where(twiddle_inside, twiddle.sin(), 0.0),
        angle2.cos(),
        angle2.sin(),
    ]
    return torch.cat([p.flatten() for p in parts]).float().to(device)


@triton.jit
def _dot(a, b, BF16: tl.constexpr):
    if BF16:
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
    return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="tf32")


@triton.jit
def _row_spectrum(
    v_ptr, stride, tab_ptr, L1, P1: tl.constexpr, L2: tl.constexpr, BF16: tl.constexpr,
    DFT: tl.constexpr,
):  # fmt: skip
    """(Re, Im) of fft(v) for one row v of length L1·L2, as (L2 × P1) tiles: F[k1 + L1 k2]
    sits at [k2, k1] (k1 < L1). Four-step: Yᵀ = Vᵀ D1, twiddle, Zᵀ = D2 Y'ᵀ (D symmetric)."""
    a = tl.arange(0, P1)
    b = tl.arange(0, L2)
    # Vᵀ[b, a] = v[a·L2 + b]
    vt = tl.load(v_ptr + (a[None, :] * L2 + b[:, None]) * stride, mask=a[None, :] < L1, other=0.0)
    if not DFT:  # profiling variant: the row itself stands in for its spectrum
        return vt.to(tl.float32), vt.to(tl.float32) * 0.5
    sq = a[:, None] * P1 + a[None, :]
    c1 = tl.load(tab_ptr + sq)
    s1 = tl.load(tab_ptr + P1 * P1 + sq)
    rect = b[:, None] * P1 + a[None, :]
    tc = tl.load(tab_ptr + 2 * P1 * P1 + rect)
    ts = tl.load(tab_ptr + 2 * P1 * P1 + L2 * P1 + rect)
    small = b[:, None] * L2 + b[None, :]
    c2 = tl.load(tab_ptr + 2 * P1 * P1 + 2 * L2 * P1 + small)
    s2 = tl.load(tab_ptr + 2 * P1 * P1 + 2 * L2 * P1 + L2 * L2 + small)
    # Step 1: a length-L1 DFT down each column (e^{-iθ}: Y = V C1 − i V S1).
    yr = _dot(vt, c1, BF16)
    yi = -_dot(vt, s1, BF16)
    # Step 2: twiddle by e^{-2πi b k1 / L}.
    pr = yr * tc + yi * ts
    pi = yi * tc - yr * ts
    # Step 3: a length-L2 DFT along each row.
    zr = _dot(c2, pr, BF16) + _dot(s2, pi, BF16)
    zi = _dot(c2, pi, BF16) - _dot(s2, pr, BF16)
    return zr, zi


@triton.jit
def _sampled_grad_kernel(
    g_ptr, x_ptr, gtab_ptr, xtab_ptr, kpos_ptr, lpos_ptr, out_ptr,
    T, n, tokens_per_program,
    stride_gt, stride_go, stride_xt, stride_xi, stride_out,
    GL1, XL1,
    GP1: tl.constexpr, GL2: tl.constexpr, XP1: tl.constexpr, XL2: tl.constexpr,
    BLOCK_J: tl.constexpr, BF16: tl.constexpr, DFT: tl.constexpr, SAMPLE: tl.constexpr,
):  # fmt: skip
    """Program (pid_t, pid_j): Σ over its tokens of Re(FG[t,k_j] FX[t,l_j]) for its pairs."""
    pid_t = tl.program_id(0)
    pid_j = tl.program_id(1)
    offs_j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    j_ok = offs_j < n
    acc = tl.zeros((BLOCK_J,), dtype=tl.float32)
    t0 = pid_t * tokens_per_program
    for t in range(t0, tl.minimum(t0 + tokens_per_program, T)):
        gr, gi = _row_spectrum(g_ptr + t * stride_gt, stride_go, gtab_ptr, GL1, GP1, GL2, BF16, DFT)
        xr, xi = _row_spectrum(x_ptr + t * stride_xt, stride_xi, xtab_ptr, XL1, XP1, XL2, BF16, DFT)
        if SAMPLE:
            kpos = tl.load(kpos_ptr + offs_j, mask=j_ok, other=0)
            lpos = tl.load(lpos_ptr + offs_j, mask=j_ok, other=0)
            ar = tl.gather(tl.reshape(gr, (GL2 * GP1,)), kpos, 0)
            ai = tl.gather(tl.reshape(gi, (GL2 * GP1,)), kpos, 0)
            br = tl.gather(tl.reshape(xr, (XL2 * XP1,)), lpos, 0)
            bi = tl.gather(tl.reshape(xi, (XL2 * XP1,)), lpos, 0)
            acc += ar * br - ai * bi
        else:  # profiling variant: keep the transforms, skip the sampled product
            acc += tl.sum(gr) + tl.sum(gi) + tl.sum(xr) + tl.sum(xi)
    tl.store(out_ptr + pid_t * stride_out + offs_j, acc, mask=j_ok)


def fused_supported(out_features: int, in_features: int) -> bool:
    """Whether rows of both lengths have a four-step plan."""
    return four_step_plan(out_features) is not None and four_step_plan(in_features) is not None


def _tile_positions(frequencies: Tensor, size: int) -> Tensor:
    """Flat position of frequency f in the (L2 × P1) spectrum tile: (f // L1)·P1 + f % L1."""
    l1, p1, _ = four_step_plan(size)
    return ((frequencies // l1) * p1 + frequencies % l1).to(torch.int32)


def fused_spectrum_grad(
    grad_out: Tensor,
    x: Tensor,
    indices: Tensor,
    scale: float,
    bf16: bool = True,
    programs: int | None = None,
    profile: str | None = None,
) -> Tensor:
    """∂L/∂c (float32, n) as :func:`~mm_spectral.kernels.spectral_grad.sampled_spectrum_grad`.

    Args:
        grad_out: (T, o); x: (T, i) — any float dtype and strides, o and i with a
            :func:`four_step_plan`.
        indices: (2, n) spectral entries; scale: α.
        bf16: DFT dots in bf16 (fast; ~3 significant digits per spectral value) rather
            than TF32.
        programs: token programs (default: 2 per SM, or 2 in the interpreter).
        profile: for timing the parts only (the result is then meaningless): "dft" runs
            the transforms without the sampled product, "sample" the loads and the
            sampled product without the transforms.
    """
    t, o = grad_out.shape
    i = x.shape[1]
    n = indices.shape[1]
    gl1, gp1, gl2 = four_step_plan(o)
    xl1, xp1, xl2 = four_step_plan(i)
    if programs is None:
        programs = 2 if INTERPRET else 2 * _sm_count(x.device)
    programs = max(1, min(programs, t))
    per_program = triton.cdiv(t, programs)
    programs = triton.cdiv(t, per_program)
    block_j = min(MAX_PAIRS_BLOCK, max(16, triton.next_power_of_2(n)))
    pair_blocks = triton.cdiv(n, block_j)
    kpos = _tile_positions(indices[0], o)
    lpos = _tile_positions(indices[1], i)
    out = torch.empty((programs, pair_blocks * block_j), device=x.device, dtype=torch.float32)
    _sampled_grad_kernel[(programs, pair_blocks)](
        grad_out, x, _dft_tables(o, x.device), _dft_tables(i, x.device), kpos, lpos, out,
        t, n, per_program,
        grad_out.stride(0), grad_out.stride(1), x.stride(0), x.stride(1), out.stride(0),
        gl1, xl1,
        GP1=gp1, GL2=gl2, XP1=xp1, XL2=xl2, BLOCK_J=block_j, BF16=bf16,
        DFT=profile != "sample", SAMPLE=profile != "dft", num_warps=8,
    )  # fmt: skip
    return out.sum(0)[:n].mul_(scale / (o * i))


@functools.lru_cache(maxsize=8)
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count
