"""Adapted layers' per-step work as C++ autograd nodes, built on first use.

An eager training step of a ViT with an adapter on every linear is bound by the host:
issuing an op from Python costs 10–20 µs, and a Python ``autograd.Function`` adds its own
bookkeeping on top. The sources in ``native/`` issue the same ops as the Python autograd
functions they stand in for (the tests hold each pair equal) from C++, one C++ autograd
node per layer: the low-rank linear of LoRA, FoRA and row blocks, DoRA's rescaled linear
and inverse norms, FLoRA's Tucker linear and conv factors, FourierFT's / FoRA's
sparse-spectrum inverse FFT, FourierFT's ``W + ΔW`` linear, and the ``W + ΔW`` conv of
every method that builds a conv's ΔW (DoRA's rescaled per channel), and the batched
builds that make the whole weight change of a chunk of same-shape linears (LoRA's and
FoRA's products, FLoRA's Tucker product, DoRA's rescaled change). They are compiled once
per machine and torch version by
``torch.utils.cpp_extension`` (about a minute; cached under ``TORCH_EXTENSIONS_DIR``).

``MM_SPECTRAL_NATIVE`` (or :func:`set_native_mode`) picks:

- ``auto`` (default): build on first use; if the build fails (no compiler or ninja), warn
  once and keep the Python function;
- ``on``: as auto, but a failed build raises;
- ``off``: never (the Python function).

``MM_SPECTRAL_NATIVE_BUILDS=off`` (or :func:`set_native_builds_mode`) keeps the batched
builds alone on their Python functions, the per-layer nodes as the mode above says.

The nodes serve eager steps. While ``torch.compile`` traces, and where the fused Triton
kernels qualify (CUDA-graph capture), the Python functions run instead.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os.path as osp
import warnings
from types import ModuleType

from .mode_switch import ModeSwitch

MODES = ("auto", "on", "off")
SOURCE_DIR = osp.join(osp.dirname(osp.abspath(__file__)), "native")
SOURCES = [
    osp.join(SOURCE_DIR, name)
    for name in (
        "module.cpp",
        "low_rank_linear.cpp",
        "spectral.cpp",
        "tucker_conv.cpp",
        "delta_conv.cpp",
        "batched_builds.cpp",
    )
]
HEADER = osp.join(SOURCE_DIR, "common.h")

_NATIVE = ModeSwitch("MM_SPECTRAL_NATIVE", MODES, "native mode")
_BUILDS = ModeSwitch("MM_SPECTRAL_NATIVE_BUILDS", ("auto", "off"), "native builds mode")


def native_builds_mode() -> str:
    """Whether the batched builds take their C++ nodes where the native mode allows
    ('auto') or keep their Python functions ('off')."""
    return _BUILDS.get()


def set_native_builds_mode(mode: str) -> str:
    """Set :func:`native_builds_mode`; returns the previous one."""
    return _BUILDS.set(mode)


def native_mode() -> str:
    """The current mode: 'auto', 'on' or 'off'."""
    return _NATIVE.get()


def set_native_mode(mode: str) -> str:
    """Set the mode (see the module docstring); returns the previous one."""
    return _NATIVE.set(mode)


@functools.cache
def _build() -> ModuleType | Exception:
    """The compiled module, or the error its build raised (built once per process)."""
    from torch.utils.cpp_extension import load

    logging.getLogger("mm_spectral").info(
        "mm_spectral: building the native low-rank linear (once per machine; about a minute)"
    )
    # torch rebuilds when the sources or the flags change; the header's hash rides in the
    # flags so that a change to it alone rebuilds too.
    with open(HEADER, "rb") as header:
        header_hash = hashlib.sha1(header.read()).hexdigest()[:12]
    try:
        return load(
            name="mm_spectral_native",
            sources=SOURCES,
            extra_cflags=["-O2", f"-DMM_SPECTRAL_HEADER_HASH={header_hash}"],
            verbose=False,
        )
    except Exception as error:  # no compiler, no ninja, incompatible headers
        return error


def native_ops() -> ModuleType | None:
    """The compiled module, or None where it is off or did not build (see the modes)."""
    mode = _NATIVE.value
    if mode == "off":
        return None
    built = _build()
    if isinstance(built, Exception):
        if mode == "on":
            raise RuntimeError(f"the native low-rank linear did not build: {built}") from built
        _warn_once(built)
        return None
    return built


def native_status() -> str:
    """'off', 'built', or 'did not build: <error>' (builds first where the mode allows)."""
    if _NATIVE.value == "off":
        return "off"
    built = _build()
    if isinstance(built, Exception):
        return f"did not build: {type(built).__name__}: {_first_error_line(built)}"
    return "built"


def _first_error_line(error: Exception) -> str:
    """The compiler's first 'error:' line where there is one, else the message's start."""
    text = str(error)
    for line in text.splitlines():
        if "error:" in line:
            return line.strip()[:300]
    return text[:300]


@functools.cache
def _warn_once(error: Exception) -> None:
    warnings.warn(
        f"mm_spectral: the native low-rank linear did not build ({type(error).__name__}: "
        f"{str(error)[:300]}); adapted linears use the Python autograd function. "
        "MM_SPECTRAL_NATIVE=off silences this.",
        stacklevel=3,
    )
