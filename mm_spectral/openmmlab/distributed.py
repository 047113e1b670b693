"""Multi-process runs through MMEngine: gloo on CPU, and what the hooks need under FSDP.

CPU processes. MMEngine picks its device by itself (``mmengine.device.get_device()``: CUDA
whenever ``torch.cuda.is_available()``), but its ``init_dist`` calls
``torch.cuda.set_device(LOCAL_RANK)`` whatever the backend ("Found no NVIDIA driver" on a
CPU machine), and its DDP / FSDP wrappers default to ``device_ids=[LOCAL_RANK]`` /
``device_id=LOCAL_RANK``, a GPU. :func:`configure_distributed` (called by
``tools/train.py`` and ``tools/test.py``) takes the backend from ``MM_SPECTRAL_DIST_BACKEND``
or ``env_cfg.dist_cfg.backend``; when no GPU is visible (a CPU machine, or
``CUDA_VISIBLE_DEVICES=`` on a GPU one) it requires gloo, starts the process group itself
and keeps the wrappers on the CPU.

FSDP. ``frozen_apart_wrap_policy`` (:mod:`mm_spectral.distributed.wrap_policy`) is
registered in MMEngine's ``FUNCTIONS`` for
``model_wrapper=dict(auto_wrap_policy=dict(type='frozen_apart_wrap_policy', ...))``, and
MMEngine 0.10.7's ``FSDPStrategy`` is fixed to resume its optimizer state on torch ≥ 2.1
(:func:`_load_optim_state_dict`).
"""

from __future__ import annotations

import datetime
import os
from typing import Any

import torch.distributed as dist
from mmengine._strategy import FSDPStrategy
from mmengine.device import get_device
from mmengine.registry import FUNCTIONS, MODEL_WRAPPERS, STRATEGIES
from torch.distributed.fsdp import FullyShardedDataParallel
from torch.nn.parallel import DistributedDataParallel

from ..distributed import frozen_apart_wrap_policy
from ..distributed.process_exit import finish_process_group, leave_process

BACKEND_ENV = "MM_SPECTRAL_DIST_BACKEND"

FUNCTIONS.register_module(name="frozen_apart_wrap_policy", module=frozen_apart_wrap_policy)


def _load_optim_state_dict(self: FSDPStrategy, state_dict: dict) -> None:
    """``FSDPStrategy.load_optim_state_dict`` with keyword arguments: MMEngine 0.10.7 passes
    (state_dict, model, optimizer) in torch 2.0's order, and torch ≥ 2.1 takes (model,
    optim, optim_state_dict), so every FSDP resume failed ("unhashable type: 'dict'")."""
    optim_state = FullyShardedDataParallel.optim_state_dict_to_load(
        model=self.model, optim=self.optim_wrapper.optimizer, optim_state_dict=state_dict
    )
    self.optim_wrapper.load_state_dict(optim_state)


FSDPStrategy.load_optim_state_dict = _load_optim_state_dict


# ----------------------------------------------------------------- launching on CPU


def configure_distributed(cfg: Any) -> None:
    """Prepare ``cfg`` (launcher other than 'none') for its process group; see the module
    docstring. On GPUs only the backend switch applies; MMEngine does the rest."""
    if cfg.get("launcher", "none") == "none":
        return
    env_cfg = dict(cfg.get("env_cfg") or {})
    dist_cfg = dict(env_cfg.get("dist_cfg") or {})
    backend = os.environ.get(BACKEND_ENV) or dist_cfg.get("backend", "nccl")
    dist_cfg["backend"] = backend
    env_cfg["dist_cfg"] = dist_cfg
    cfg.env_cfg = env_cfg
    if get_device() != "cpu":
        return
    if backend != "gloo":
        raise RuntimeError(
            f"no GPU is visible, and the '{backend}' backend needs one: run CPU processes "
            f"with gloo, e.g. {BACKEND_ENV}=gloo bash tools/dist_train.sh CONFIG 2 "
            "(or --cfg-options env_cfg.dist_cfg.backend=gloo)"
        )
    _keep_wrappers_on_cpu(cfg)
    if not dist.is_initialized():
        kwargs = {k: v for k, v in dist_cfg.items() if k != "backend"}
        if "timeout" in kwargs:  # seconds in MMEngine configs
            kwargs["timeout"] = datetime.timedelta(seconds=kwargs["timeout"])
        dist.init_process_group(backend=backend, **kwargs)


_finished_group = False  # finish_distributed ran in a process group


def finish_distributed() -> None:
    """Wait for every rank and close an NCCL group; a gloo group is left for
    :func:`leave_if_distributed` (:mod:`mm_spectral.distributed.process_exit`: tearing
    gloo down beside the peers' teardown could abort a rank whose run had succeeded). A
    no-op outside a process group."""
    global _finished_group
    _finished_group = finish_process_group() or _finished_group


def leave_if_distributed(code: int = 0) -> None:
    """End a rank that :func:`finish_distributed` finished: ``atexit`` callbacks, flushed
    logs, then ``os._exit(code)`` (:func:`~mm_spectral.distributed.process_exit.leave_process`);
    else return."""
    if _finished_group:
        leave_process(code)


def _keep_wrappers_on_cpu(cfg: Any) -> None:
    """DDP: ``device_ids=None`` (CPU modules take none); FSDP: ``device_id='cpu'``."""
    if cfg.get("runner_type") in ("FlexibleRunner", "mmengine.FlexibleRunner"):
        strategy = cfg.get("strategy") or dict(type="DDPStrategy")
        if _is_subclass(STRATEGIES, strategy["type"], FSDPStrategy):
            wrapper = dict(type="MMFullyShardedDataParallel", device_id="cpu")
        else:
            wrapper = dict(type="MMDistributedDataParallel", broadcast_buffers=False)
        wrapper.update(strategy.get("model_wrapper") or {})
        strategy["model_wrapper"] = _cpu_wrapper(wrapper)
        cfg.strategy = strategy
    else:
        default = dict(
            type="MMDistributedDataParallel",
            broadcast_buffers=False,
            find_unused_parameters=cfg.get("find_unused_parameters", False),
        )
        cfg.model_wrapper_cfg = _cpu_wrapper(dict(cfg.get("model_wrapper_cfg") or default))


def _cpu_wrapper(wrapper: dict) -> dict:
    kind = wrapper.get("type", "MMDistributedDataParallel")
    if _is_subclass(MODEL_WRAPPERS, kind, DistributedDataParallel):
        wrapper["device_ids"] = None
    elif _is_subclass(MODEL_WRAPPERS, kind, FullyShardedDataParallel):
        wrapper["device_id"] = "cpu"
    return wrapper


def _is_subclass(registry: Any, kind: str | type, base: type) -> bool:
    kind = registry.get(kind) if isinstance(kind, str) else kind
    return isinstance(kind, type) and issubclass(kind, base)
