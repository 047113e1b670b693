"""The core's file I/O: atomic writes and the one checkpoint loader's policy."""

from __future__ import annotations

import argparse
import os
import pickle
import stat

import pytest
import torch
from torch import nn

import mm_spectral
from mm_spectral.inject import cast_frozen
from mm_spectral.state import atomic_open, atomic_save, atomic_write_text, load_checkpoint_file


def test_atomic_save_writes_complete_files_with_normal_permissions(tmp_path):
    path = tmp_path / "sub" / "ckpt.pth"
    atomic_save({"w": torch.arange(5.0)}, path)
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.arange(5.0))
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask  # not mkstemp's 0600
    atomic_write_text("a = 1\n", tmp_path / "cfg.py")
    assert (tmp_path / "cfg.py").read_text() == "a = 1\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg.py", "sub"]  # no temporaries


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "ckpt.pth"
    atomic_save({"w": torch.ones(3)}, path)
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_open(path) as handle:
            handle.write(b"partial bytes")
            raise RuntimeError("disk full")
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pth"]


def test_loader_reads_tensors_weights_only_and_memory_maps_on_request(tmp_path):
    path = tmp_path / "plain.pth"
    torch.save({"state_dict": {"w": torch.ones(4)}, "meta": {"epoch": 3}}, path)
    for mmap in (False, True):
        ckpt = load_checkpoint_file(path, mmap=mmap)
        assert ckpt["meta"] == {"epoch": 3} and torch.equal(ckpt["state_dict"]["w"], torch.ones(4))
    legacy = tmp_path / "legacy.pth"
    torch.save({"w": torch.ones(2)}, legacy, _use_new_zipfile_serialization=False)
    assert torch.equal(load_checkpoint_file(legacy, mmap=True)["w"], torch.ones(2))


def test_loader_unpickles_other_globals_only_for_trusted_files_and_says_so(tmp_path):
    path = tmp_path / "with_args.pth"
    torch.save({"w": torch.ones(2), "args": argparse.Namespace(lr=0.5)}, path)
    with pytest.raises(pickle.UnpicklingError, match="trust"):
        load_checkpoint_file(path, trusted=False)
    with pytest.warns(UserWarning, match="weights_only=True"):
        ckpt = load_checkpoint_file(path)
    assert ckpt["args"].lr == 0.5
    with open(path, "rb") as handle:  # a file object (MMEngine's remote loaders) rewinds
        with pytest.warns(UserWarning):
            assert load_checkpoint_file(handle)["args"].lr == 0.5


def test_layer_delta_follows_the_weight_dtype_when_the_adapter_stays_float32():
    """frozen_dtype: weights in bf16, adapters in float32; ΔW comes back in bf16."""
    model = nn.Sequential(nn.Linear(8, 6))
    mm_spectral.inject(model, dict(type="LoRA", rank=2, targets=["0"]))
    with torch.no_grad():
        model[0].adapter.lora_B.normal_()
    cast_frozen(model, torch.bfloat16)
    assert model[0].weight.dtype == torch.bfloat16
    assert model[0].adapter.lora_A.dtype == torch.float32
    assert model[0].delta_weight().dtype == torch.bfloat16
    assert model[0].adapter.delta_weight().dtype == torch.float32
    merged = mm_spectral.merged_state_dict(model)
    assert merged["0.weight"].dtype == torch.bfloat16
