"""A process killed (SIGKILL) while it saves a checkpoint leaves the previous file complete
under the final name, never a truncated one (issue 12, item 5); the temporary it leaves
is removed by the next save of that path. Covers the core's atomic_save (merged
checkpoints, adapter files, configs, converted weights) and MMEngine's save_checkpoint
as mm_spectral.openmmlab patches it (the Runner's epoch_N.pth / iter_N.pth)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from mm_spectral.state import atomic_save

ROOT = Path(__file__).resolve().parents[1]
BIG = 16 * 2**20  # float32 elements: 64 MiB per save
CHILD = """
import sys, torch
path, writer = sys.argv[1], sys.argv[2]
if writer == "mmengine":
    import mm_spectral.openmmlab  # noqa: F401  (patches mmengine's save_checkpoint)
    from mmengine.runner.checkpoint import save_checkpoint as save
else:
    from mm_spectral.state import atomic_save as save
save({{"version": 1, "w": torch.zeros(8)}}, path)
print("READY", flush=True)
big = {{"version": 2, "w": torch.randn({big})}}
while True:
    save(big, path)
"""


def write_in_progress(path: Path, old_size: int, done_size: int) -> bool:
    """A temporary beside ``path`` exists, or ``path`` itself is neither the old file nor
    a complete new one (how a non-atomic writer truncates and refills it)."""
    for entry in os.scandir(path.parent):
        if entry.name.endswith(".tmp"):
            return True
        if (
            entry.name == path.name
            and entry.stat().st_size not in (old_size,)
            and (entry.stat().st_size < done_size)
        ):
            return True
    return False


@pytest.mark.parametrize("writer", ["atomic_save", "mmengine"])
def test_kill_during_save_leaves_the_old_file_whole(writer, tmp_path):
    path = tmp_path / "ckpt.pth"
    child = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(CHILD.format(big=BIG)), str(path), writer],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        for line in child.stdout:  # libraries may print before
            if line.strip() == "READY":
                break
        assert path.is_file()
        old_size, done_size = path.stat().st_size, 4 * BIG  # a new file is at least this large
        deadline = time.monotonic() + 60
        while not write_in_progress(path, old_size, done_size) and time.monotonic() < deadline:
            time.sleep(0.0005)
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    ckpt = torch.load(path, weights_only=True)  # raises on a truncated file
    assert ckpt["version"] in (1, 2)
    assert ckpt["w"].numel() == (8 if ckpt["version"] == 1 else BIG)
    atomic_save({"version": 3}, path)  # the next save removes the dead writer's temporary
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pth"]
