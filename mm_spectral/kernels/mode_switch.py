"""A process-wide mode read from an environment variable and settable at run time.

Shared by the switches of :mod:`mm_spectral.kernels`: whether the fused Triton kernels
run (``MM_SPECTRAL_FUSED_LOW_RANK``) and whether the C++ nodes do (``MM_SPECTRAL_NATIVE``).
"""

from __future__ import annotations

import os


class ModeSwitch:
    """One of ``modes``, from ``env`` (default ``default``); an invalid value is refused at
    import and at :meth:`set`. Read ``value`` where a decision is made."""

    def __init__(self, env: str, modes: tuple[str, ...], label: str, default: str = "auto"):
        self.modes, self.label = modes, label
        self.value = os.environ.get(env, default)
        if self.value not in modes:
            raise ValueError(f"{env} must be one of {modes}, got {self.value!r}")

    def get(self) -> str:
        """The current mode."""
        return self.value

    def set(self, mode: str) -> str:
        """Set the mode; returns the previous one."""
        if mode not in self.modes:
            raise ValueError(f"{self.label} must be one of {self.modes}, got {mode!r}")
        previous, self.value = self.value, mode
        return previous
