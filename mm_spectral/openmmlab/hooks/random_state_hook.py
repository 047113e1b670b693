"""Exact resume: random generator states travel with checkpoints, and data workers are
seeded per epoch, so a resumed run draws what an uninterrupted one draws.

What MMEngine does and what differs after a resume (mmengine 0.10.7):

- The main process's generators (python ``random``, numpy, torch CPU and CUDA) drive
  augmentation when ``num_workers=0``, samplers of the heads (RPN / RoI sampling),
  dropout, and each DataLoader iterator's base seed. They are not checkpointed, and
  between a save and the next batch an uninterrupted run also validates while a
  resumed one replays skipped batches (iteration loops), and persistent workers' iterator
  draws its base seed once per run. This hook saves them in the checkpoint
  (``rng_state``) and sets them back in both runs at the same point: the next fetch of an
  iteration loop, an epoch's start, or its first iteration with persistent workers.
- Workers: MMEngine seeds each with ``seed + worker_id + num_workers * rank`` when it
  starts. Non-persistent workers restart every epoch with the same seeds; persistent
  ones keep their generators from epoch to epoch, which a resumed run cannot rebuild.
  This hook reseeds every worker from (seed, rank, worker, epoch) at its first sample
  of each epoch, so persistent or not, resumed or not, epoch ``e`` augments the same way.
  Iteration loops need nothing more: their workers start once and MMEngine replays the
  skipped batches through them.

Multi-process runs: checkpoints are written by rank 0, so its generators are restored
exactly; the other ranks keep theirs (a warning says so).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from mmengine.dist import get_rank
from mmengine.hooks import Hook
from mmengine.registry import HOOKS
from torch.utils.data import get_worker_info

RNG_KEY = "rng_state"


def capture_rng_state() -> dict[str, Any]:
    """The states of python's, numpy's, torch's CPU and (initialised) CUDA generators, in
    types ``torch.load(weights_only=True)`` accepts (numpy's key as an int64 tensor)."""
    legacy = np.random.get_state(legacy=False)
    numpy_state = dict(
        bit_generator=legacy["bit_generator"],
        key=torch.from_numpy(legacy["state"]["key"].astype(np.int64)),
        pos=int(legacy["state"]["pos"]),
        has_gauss=int(legacy["has_gauss"]),
        gauss=float(legacy["gauss"]),
    )
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []
    return dict(python=random.getstate(), numpy=numpy_state, torch=torch.get_rng_state(), cuda=cuda)


def restore_rng_state(state: dict[str, Any]) -> None:
    """Set every generator :func:`capture_rng_state` captured, wherever its tensors were
    loaded: on a GPU machine MMEngine loads a checkpoint onto the GPU (``map_location``
    'default'), and the generators take CPU tensors."""
    state = _on_cpu(state)
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    saved = state["numpy"]
    np.random.set_state(
        dict(
            bit_generator=saved["bit_generator"],
            state=dict(key=saved["key"].numpy().astype(np.uint32), pos=saved["pos"]),
            has_gauss=saved["has_gauss"],
            gauss=saved["gauss"],
        )
    )
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        if len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])


def _on_cpu(value: Any) -> Any:
    """``value`` with every tensor in it (through dicts, lists and tuples) on the CPU."""
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, dict):
        return {k: _on_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_on_cpu(v) for v in value)
    return value


@HOOKS.register_module()
class RandomStateHook(Hook):
    """Saves the generators' states in every checkpoint and restores them on resume at the
    point where the saved run went on drawing batches; seeds data workers per epoch.
    ``tools/train.py`` registers it; add ``dict(type='RandomStateHook')`` to
    ``custom_hooks`` for other entry points."""

    priority = "VERY_LOW"  # late at an epoch start; before AdapterHook copies checkpoints

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None  # the state to set at its (epoch, iter)
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        meta = checkpoint.get("meta", {})
        state = dict(capture_rng_state(), epoch=meta.get("epoch"), iter=meta.get("iter"))
        checkpoint[RNG_KEY] = state
        self._pending = state  # this run, too, goes on from the saved state

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        state = checkpoint.get(RNG_KEY)
        if state is None or not getattr(runner, "_resume", False):
            return
        if get_rank() != 0:
            runner.logger.warning(
                "RandomStateHook: the checkpoint holds rank 0's generator states; this "
                "rank goes on with its own (its draws differ from an uninterrupted run)"
            )
            return
        self._pending = state

    def before_train(self, runner) -> None:
        loop = runner.train_loop
        if hasattr(loop, "dataloader_iterator"):  # iteration loop: restore at a fetch
            loop.dataloader_iterator = _RestoringIterator(loop.dataloader_iterator, self)
        seed = runner.seed if runner.seed is not None else 0
        for dataset in _datasets(runner.train_dataloader.dataset):
            pipeline = getattr(dataset, "pipeline", None)
            if callable(pipeline) and not isinstance(pipeline, EpochSeededPipeline):
                dataset.pipeline = EpochSeededPipeline(pipeline, seed, get_rank(), self._epoch)

    def before_train_epoch(self, runner) -> None:
        self._epoch[0] = runner.epoch
        if self._restore_point(runner) == "epoch":
            self.restore_if_due(runner.epoch, runner.iter)

    def before_train_iter(self, runner, batch_idx: int, data_batch=None) -> None:
        if self._restore_point(runner) == "iter":
            self.restore_if_due(runner.epoch, runner.iter)

    @staticmethod
    def _restore_point(runner) -> str:
        """Where the main process's generators are set back in an epoch loop: at the epoch's
        start, before its DataLoader iterator draws its base seed, unless the workers are
        persistent: their iterator draws once per run (a resumed run draws at the resumed
        epoch, an uninterrupted one does not), so then at the first iteration (the data
        come from the workers, seeded per epoch)."""
        if hasattr(runner.train_loop, "dataloader_iterator"):
            return "fetch"
        loader = runner.train_dataloader
        persistent = loader.num_workers > 0 and getattr(loader, "persistent_workers", False)
        return "iter" if persistent else "epoch"

    def restore_if_due(self, epoch: int | None, iteration: int) -> None:
        """Set the pending state if the run stands where it was saved."""
        pending = self._pending
        if pending is None or pending["iter"] != iteration:
            return
        if epoch is not None and pending["epoch"] != epoch:
            return
        restore_rng_state(pending)
        self._pending = None


class _RestoringIterator:
    """An iteration loop's batch iterator that restores the pending state right before
    the fetch of the saved iteration (after MMEngine's replay of skipped batches)."""

    def __init__(self, inner: Iterator, hook: RandomStateHook) -> None:
        self.inner, self.hook, self.fetched = inner, hook, 0

    def __iter__(self) -> _RestoringIterator:
        return self

    def __next__(self) -> Any:
        self.hook.restore_if_due(None, self.fetched)
        self.fetched += 1
        return next(self.inner)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class EpochSeededPipeline:
    """A dataset's pipeline that, in a worker process, reseeds python, numpy and torch
    from (seed, rank, worker, epoch) at the worker's first sample of each epoch."""

    def __init__(self, pipeline: Callable, seed: int, rank: int, epoch: torch.Tensor) -> None:
        self.pipeline, self.seed, self.rank, self.epoch = pipeline, seed, rank, epoch
        self._seeded_epoch: int | None = None  # per process: each worker has its copy

    def __call__(self, results: Any) -> Any:
        worker = get_worker_info()
        if worker is not None:
            epoch = int(self.epoch[0])
            if epoch != self._seeded_epoch:
                self._seeded_epoch = epoch
                entropy = [self.seed % 2**32, self.rank, worker.id, epoch]
                seed = int(np.random.SeedSequence(entropy).generate_state(1)[0])
                random.seed(seed)
                np.random.seed(seed)
                torch.manual_seed(seed)
        return self.pipeline(results)

    def __getattr__(self, name: str) -> Any:
        if name == "pipeline":
            raise AttributeError(name)
        return getattr(self.pipeline, name)  # transforms, __repr__ users, …


def _datasets(dataset: Any) -> Iterator[Any]:
    """``dataset`` and the datasets it wraps (Concat / Repeat / ClassBalanced …)."""
    yield dataset
    for inner in getattr(dataset, "datasets", None) or []:
        yield from _datasets(inner)
    inner = getattr(dataset, "dataset", None)
    if inner is not None and inner is not dataset:
        yield from _datasets(inner)
