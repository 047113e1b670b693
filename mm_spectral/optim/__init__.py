"""Optimizer wrapper constructors that see only what trains."""

from .adapter_optim_constructor import AdapterOptimWrapperConstructor

__all__ = ["AdapterOptimWrapperConstructor"]
