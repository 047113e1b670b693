"""AdapterSyncCheckHook under a real two-process gloo group: agreement passes, drift fails."""

from __future__ import annotations

import os
import socket
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

pytest.importorskip("mmengine")

import mm_spectral  # noqa: E402
from mm_spectral.openmmlab.hooks import AdapterSyncCheckHook  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DRIFTS = ("none", "weights", "entries", "swapped")


def _worker(rank: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        for drift in DRIFTS:
            _check(rank, drift, results)
    finally:
        dist.destroy_process_group()


def _check(rank: int, drift: str, results) -> None:
    """Builds the same adapted model on both ranks, lets rank 1 drift, runs the hook."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Conv2d(3, 4, 3))
    mm_spectral.inject(model, dict(type="FoRA", rank=4, n=10, targets=[r"0"]))
    mm_spectral.inject(model, dict(type="FLoRA", rank=2, targets=[r"1"]))
    if rank == 1 and drift == "weights":
        with torch.no_grad():
            model[1].adapter.core.add_(1e-6)
    if rank == 1 and drift == "entries":
        model[0].adapter.a_indices[0, 0] += 1
    if rank == 1 and drift == "swapped":  # same values, different order
        model[0].adapter.a_indices.copy_(model[0].adapter.a_indices.flip(1))
    logger = SimpleNamespace(info=lambda msg: results.put((drift, rank, "ok", msg)))
    runner = SimpleNamespace(model=model, iter=7, logger=logger)
    try:
        AdapterSyncCheckHook().after_train(runner)
    except RuntimeError as err:
        results.put((drift, rank, "error", str(err)))


def test_sync_hook_passes_identical_ranks_and_catches_every_drift():
    results = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(_worker, args=(_free_port(), results), nprocs=2, start_method="spawn")
    outcomes: dict[str, list] = {drift: [] for drift in DRIFTS}
    for _ in range(2 * len(DRIFTS)):
        drift, _rank, kind, message = results.get()
        outcomes[drift].append((kind, message))
    for drift, seen in outcomes.items():
        kinds = {kind for kind, _ in seen}
        if drift == "none":
            assert kinds == {"ok"}, seen
            assert "identical on all 2 ranks after 7 iterations" in seen[0][1]
        else:
            assert kinds == {"error"}, (drift, seen)
            assert "adapters differ across ranks" in seen[0][1]
