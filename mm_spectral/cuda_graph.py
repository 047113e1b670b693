"""Replay a module's training forward and backward as CUDA graphs when its input shape repeats.

With adapters on every layer, an eager training step on a fast GPU is bound by the host's
per-op dispatch (see the README's Performance section). A backbone fed fixed-size crops
(segmentation at 512², detection with a fixed resize) sees the same input shape every
iteration, so its forward and backward can be captured once and replayed: the host then
issues one graph launch instead of thousands of ops. Everything else (inputs of another
shape, eval mode, no grad, CPU, a merged adapter) runs the ordinary eager forward.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .adapters.base import is_adapted
from .adapters.packed_weights import pin_in_place


class _Captured(nn.Module):
    """Holds the module so that make_graphed_callables sees (and differentiates) its parameters."""

    def __init__(self, module: nn.Module, eager_forward: Callable[..., Any]) -> None:
        super().__init__()
        self.module = module
        self.eager_forward = eager_forward

    def forward(self, x: Tensor) -> Any:
        return self.eager_forward(x)


class CudaGraphForward:
    """Stands in for ``module.forward``: replays a captured graph per (shape, dtype, autocast).

    Captures lazily, on the first training call with a new input signature, at most
    ``max_shapes`` graphs (each keeps its own activation memory); later new shapes run
    eagerly with one warning. Parameters are read and written in place by the graphs, so
    optimizers and ``load_state_dict`` work as usual; moving the module to another device
    after a capture needs :func:`disable_cuda_graph` first. Copies and pickles of the
    module get a fresh instance without graphs.
    """

    def __init__(self, module: nn.Module, max_shapes: int = 2, warmup_iters: int = 3) -> None:
        self.module = module
        self.max_shapes, self.warmup_iters = max_shapes, warmup_iters
        self.graphs: dict[tuple, nn.Module] = {}
        self._adapted: list[nn.Module] | None = None
        self._warned = False

    def __reduce__(self) -> tuple:
        return (type(self), (self.module, self.max_shapes, self.warmup_iters))

    def eager(self, *args: Any, **kwargs: Any) -> Any:
        """The module class's own forward."""
        return type(self.module).forward(self.module, *args, **kwargs)

    def __call__(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        key = self._signature(x) if not (args or kwargs) else None
        if key is None:
            return self.eager(x, *args, **kwargs)
        graphed = self.graphs.get(key)
        if graphed is None:
            if len(self.graphs) >= self.max_shapes:
                if not self._warned:
                    warnings.warn(
                        f"{type(self.module).__name__}: input {tuple(x.shape)} is a new shape "
                        f"beyond max_shapes={self.max_shapes} CUDA graphs; running it eagerly",
                        stacklevel=2,
                    )
                    self._warned = True
                return self.eager(x)
            graphed = self.graphs[key] = self._capture(x)
        return graphed(x)

    def _signature(self, x: Any) -> tuple | None:
        """The graph key of this call, or None when it must run eagerly."""
        if not (isinstance(x, Tensor) and x.is_cuda and self.module.training):
            return None
        if self._adapted is None:
            self._adapted = [m for m in self.module.modules() if is_adapted(m)]
        if not torch.is_grad_enabled() or any(layer.merged for layer in self._adapted):
            return None  # a merged adapter runs another path than the one captured
        autocast = torch.is_autocast_enabled("cuda")
        dtype = torch.get_autocast_dtype("cuda") if autocast else None
        return (tuple(x.shape), x.dtype, x.device, x.requires_grad, autocast, dtype)

    def _capture(self, x: Tensor) -> nn.Module:
        captured = _Captured(self.module, self.eager)
        autocast = torch.is_autocast_enabled("cuda")
        dtype = torch.get_autocast_dtype("cuda")
        sample = x.detach().clone().requires_grad_(x.requires_grad)
        # The graph reads the weights where they are now: a batched build's plan must not
        # move them into one buffer afterwards (packed_weights), or replays read freed memory.
        pin_in_place(self.module.parameters())
        # A graph cannot use autocast's weight-cast cache (it would outlive the capture).
        with torch.autocast("cuda", dtype=dtype, enabled=autocast, cache_enabled=False):
            return torch.cuda.make_graphed_callables(
                captured,
                (sample,),
                num_warmup_iters=self.warmup_iters,
                allow_unused_input=True,
            )


def enable_cuda_graph(module: nn.Module, max_shapes: int = 2, warmup_iters: int = 3) -> nn.Module:
    """Make ``module``'s training forward+backward replay CUDA graphs per input shape; in place.

    The module must take one tensor and return tensors (a backbone), stay on its CUDA
    device (move it first), and not use activation checkpointing or host synchronisation
    inside its forward. Returns ``module``.
    """
    if not isinstance(module.__dict__.get("forward"), CudaGraphForward):
        module.forward = CudaGraphForward(module, max_shapes, warmup_iters)  # type: ignore[method-assign]
    return module


def disable_cuda_graph(module: nn.Module) -> nn.Module:
    """Drop the captured graphs (and their memory) and restore the eager forward."""
    if isinstance(module.__dict__.get("forward"), CudaGraphForward):
        del module.__dict__["forward"]
    return module
