"""How a rank of a finished multi-process run ends, PyTorch only.

Tearing down a gloo process group while the peer ranks tear down theirs can abort a rank
("terminate called without an active exception", SIGABRT) after all its work is done, and
torchrun then reports the whole run as failed. It struck with the group destroyed
explicitly after a barrier (a 2-rank FSDP training in CI), explicitly without one
(``tools/benchmark_fsdp.py``) and implicitly at interpreter exit (4 of 20 resumed runs
here). So a finished rank waits for the others, closes an NCCL group as NCCL wants, and
leaves a gloo group to the operating system: :func:`leave_process` ends the process
without the interpreter's teardown, after the ``atexit`` callbacks and flushing.
"""

from __future__ import annotations

import atexit
import faulthandler
import logging
import os
import sys
from typing import NoReturn

import torch
import torch.distributed as dist


def report_crashes() -> None:
    """Print every thread's Python stack if the process dies of a signal (SIGSEGV,
    SIGABRT, ...): torchrun alone says only "Signal 6 received by PID ..."."""
    if not faulthandler.is_enabled():
        faulthandler.enable(all_threads=True)


def finish_process_group() -> bool:
    """Wait for every rank; destroy an NCCL group, keep a gloo one for
    :func:`leave_process` (see the module docstring). Whether a group was there."""
    if not (dist.is_available() and dist.is_initialized()):
        return False
    if dist.get_backend() == "nccl":  # the rank's own GPU (set by the launcher), not a guess
        dist.barrier(device_ids=[torch.cuda.current_device()])
        dist.destroy_process_group()
    else:
        dist.barrier()
    return True


def leave_process(code: int = 0) -> NoReturn:
    """Run the ``atexit`` callbacks, flush logs and streams, then ``os._exit(code)``:
    the interpreter's teardown (and with it gloo's) never runs."""
    atexit._run_exitfuncs()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)
