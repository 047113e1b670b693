"""The hooks and tools under FSDP, in a real two-process gloo group on the CPU.

One spawn (module fixture) wraps a toy adapted model with FSDP (``use_orig_params=True``,
:func:`frozen_apart_wrap_policy`), trains it two steps and records, per rank, what the
hooks and helpers produce next to references that do not go through them: the unwrapped
model built from the same seed, and FSDP's own ``FULL_STATE_DICT``. Each test checks one
of issue 12 item 9's failures: the sync check compared shards, the adapter file held
flattened / empty shards, a sharded directory could not be merged, the trainable table
counted shards; and that the wrap policy keeps frozen and trainable parameters apart.
"""

from __future__ import annotations

import functools
import os
import shutil
import socket
import traceback
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

pytest.importorskip("mmengine")

from mmengine.config import Config  # noqa: E402
from mmengine.registry import MODELS  # noqa: E402
from torch.distributed.fsdp import FullStateDictConfig, StateDictType  # noqa: E402
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP  # noqa: E402

import mm_spectral  # noqa: E402
import mm_spectral.openmmlab  # noqa: E402,F401  (registers)
from mm_spectral.adapters.batched_spectra import has_batched_spectra  # noqa: E402
from mm_spectral.delta_stats import delta_stats  # noqa: E402
from mm_spectral.distributed import (  # noqa: E402
    frozen_apart_wrap_policy,
    fsdp_units,
    full_parameters,
    own_parameters,
    read_sharded_checkpoint,
)
from mm_spectral.openmmlab.checkpoint import (  # noqa: E402
    adapter_tensors,
    frozen_backbone_keys,
    merge_checkpoint,
)
from mm_spectral.openmmlab.hooks import AdapterHook, AdapterSyncCheckHook  # noqa: E402
from mm_spectral.openmmlab.hooks.gather import merged_full_state, trainable_table  # noqa: E402
from mm_spectral.report import trainable_report  # noqa: E402
from mm_spectral.state import load_checkpoint_file, merged_state_dict  # noqa: E402

from conftest import randomize_adapter  # noqa: E402


# ---------------------------------------------------------------- toy registered modules
class FsdpToyBlock(nn.Module):
    """A frozen norm and two adapted linears: one FSDP unit per block, by class name."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.fc1(self.norm(x))))


@MODELS.register_module(name="FsdpToyBackbone", force=True)
class FsdpToyBackbone(nn.Module):
    """Conv stem → tokens → 2 blocks → a (trainable) output norm: (B,3,6,6) → (B,36,8)."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 3, padding=1)
        self.blocks = nn.Sequential(FsdpToyBlock(dim), FsdpToyBlock(dim))
        self.out_norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_norm(self.blocks(self.stem(x).flatten(2).transpose(1, 2)))


@MODELS.register_module(name="FsdpToyModel", force=True)
class FsdpToyModel(nn.Module):
    def __init__(self, backbone: dict, classes: int = 3) -> None:
        super().__init__()
        self.backbone = MODELS.build(backbone)
        self.head = nn.Linear(8, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


ADAPTER = dict(type="FoRA", rank=4, n=12, scale=2.0, seed=3, targets=[r"stem", r"blocks\.\d\.fc\d"])
CFG = dict(
    model=dict(
        type="FsdpToyModel",
        backbone=dict(
            type="AdaptedBackbone",
            backbone=dict(type="FsdpToyBackbone"),
            adapter=ADAPTER,
            trainable=[r"out_norm\..*"],
        ),
    )
)
POLICY = functools.partial(
    frozen_apart_wrap_policy, min_num_params=100, module_classes=("FsdpToyBlock",)
)
INPUT = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(9))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _plain_model() -> nn.Module:
    """The adapted model, the same on every call, adapters non-zero (a zero ΔW proves
    nothing about merging)."""
    torch.manual_seed(0)
    model = MODELS.build(CFG["model"])
    for _, layer in mm_spectral.adapted_layers(model):
        randomize_adapter(layer.adapter)
    return model


def _train_two_steps(model: nn.Module, rank: int) -> None:
    """Different data per rank: FSDP averages the gradients, adapters become non-zero."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    gen = torch.Generator().manual_seed(100 + rank)
    for _ in range(2):
        model(torch.randn(4, 3, 6, 6, generator=gen)).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()


def _runner(model: nn.Module, work: Path, logged: list) -> SimpleNamespace:
    info = {"last_ckpt": str(work / "iter_2.pth")}
    hub = SimpleNamespace(runtime_info=info, update_info=info.__setitem__)
    logger = SimpleNamespace(info=logged.append)
    return SimpleNamespace(model=model, iter=2, logger=logger, message_hub=hub)


def _checks(rank: int, work: Path) -> dict:
    facts: dict = {}
    plain = _plain_model()
    reference_table = trainable_report(plain)
    fsdp = FSDP(
        _plain_model(), auto_wrap_policy=POLICY, use_orig_params=True, device_id=torch.device("cpu")
    )
    # batched spectral builds run before the backbone's forward, when nested units hold
    # shards: under FSDP each layer builds its own (the plain model batches its groups)
    facts["batched"] = (
        has_batched_spectra(plain.backbone),
        has_batched_spectra(fsdp.module.backbone),
    )
    _train_two_steps(fsdp, rank)
    with FSDP.state_dict_type(
        fsdp, StateDictType.FULL_STATE_DICT, FullStateDictConfig(rank0_only=True)
    ):
        full = {k: v.clone() for k, v in fsdp.state_dict().items()}  # FSDP's own gather
    if rank == 0:
        plain.load_state_dict(full, strict=True)

    # the wrap policy: units uniform but the root, adapters apart, the block by class name
    units = fsdp_units(fsdp)
    facts["units"] = [
        (
            name,
            type(u.module).__name__,
            sorted({p.requires_grad for _, p in own_parameters(u.module)}),
        )
        for name, u in units
    ]

    # the trainable table: unsharded counts; the shards' own counts differ
    facts["table"] = trainable_table(fsdp)
    facts["reference_table"] = reference_table
    facts["shard_table"] = trainable_report(fsdp.module)

    # the sync check on the gathered tensors: agreement passes, drift of entries fails
    logged: list = []
    runner = _runner(fsdp, work, logged)
    AdapterSyncCheckHook().after_train(runner)
    facts["sync_log"] = logged[-1]
    facts["adapter_keys"] = len([k for k in plain.state_dict() if ".adapter." in k])

    # the adapter-only file AdapterHook writes beside a (sharded) checkpoint
    if rank == 0:
        (work / "iter_2.pth").mkdir()
    dist.barrier()
    with FSDP.state_dict_type(fsdp, StateDictType.LOCAL_STATE_DICT):  # as FlexibleRunner saves
        checkpoint = {"state_dict": fsdp.state_dict(), "meta": {}}
    AdapterHook().before_save_checkpoint(runner, checkpoint)  # FlexibleRunner: every rank
    dist.barrier()
    if rank == 0:
        saved = adapter_tensors(load_checkpoint_file(str(work / "iter_2_adapter.pth")))
        frozen = frozen_backbone_keys(plain)
        facts["file_keys"] = sorted(saved)
        facts["expected_keys"] = sorted(k for k in full if k not in frozen)
        facts["file_mismatch"] = [k for k, v in saved.items() if not torch.equal(v, full[k])]
        facts["file_adapters"] = sorted(k for k in saved if ".adapter." in k)
        meta = load_checkpoint_file(str(work / "iter_2_adapter.pth"))["meta"]
        facts["file_meta_prefixes"] = sorted(meta["mm_spectral"]["backbones"])
        facts["file_fingerprint"] = sorted(meta["mm_spectral"]["base_fingerprint"])
        facts["expected_fingerprint"] = sorted(frozen)

    # a sharded checkpoint as MMEngine's FSDPStrategy writes it (state_dict_cfg='local')
    sharded = work / "sharded.pth"
    with FSDP.state_dict_type(fsdp, StateDictType.LOCAL_STATE_DICT):
        local = fsdp.state_dict()
    sharded.mkdir(exist_ok=True)
    torch.save(dict(state_dict=local, meta=dict(iter=2)), sharded / f"rank{rank}.pth")
    dist.barrier()
    if rank == 0:
        read = read_sharded_checkpoint(sharded, like=plain.state_dict())
        facts["sharded_mismatch"] = [
            k for k in full if not torch.equal(read["state_dict"][k], full[k])
        ]
        facts["sharded_from"], facts["sharded_meta"] = read["sharded_from"], read["meta"]
        merged, plain_cfg = merge_checkpoint(Config(CFG), str(sharded))
        stock = MODELS.build(plain_cfg.model)
        stock.load_state_dict(merged, strict=True)
        with torch.no_grad():
            facts["merged_gap"] = (stock(INPUT) - plain(INPUT)).abs().max().item()
        key = "backbone.blocks.0.fc1.weight"
        facts["merged_weight_change"] = (merged[key] - full[key]).abs().max().item()
        partial = work / "one_rank.pth"
        partial.mkdir()
        shutil.copy(sharded / "rank0.pth", partial / "rank0.pth")
        try:
            read_sharded_checkpoint(partial, like=plain.state_dict())
        except ValueError as err:
            facts["one_rank_error"] = str(err)

    # merge_at_end and DeltaStatsHook's view under FSDP
    merged_end = merged_full_state(fsdp)
    with full_parameters(fsdp):
        stats = delta_stats(fsdp.module) if rank == 0 else {}
    if rank == 0:
        reference = merged_state_dict(plain)
        facts["merged_end_keys_equal"] = set(merged_end) == set(reference)
        facts["merged_end_gap"] = max(
            (merged_end[k] - reference[k]).abs().max().item() for k in reference
        )
        facts["delta_stats"], facts["reference_delta_stats"] = stats, delta_stats(plain)

    # FLoRA keeps its factors in an nn.ParameterList, which has no forward: not a unit
    torch.manual_seed(0)
    flora = nn.Sequential(nn.Linear(6, 40), nn.ReLU(), nn.Linear(40, 6))
    mm_spectral.inject(flora, dict(type="FLoRA", rank=4, targets=[r"0", r"2"]))
    wrapped = FSDP(flora, auto_wrap_policy=POLICY, use_orig_params=True, device_id="cpu")
    wrapped(torch.randn(3, 6)).sum().backward()
    facts["flora_units"] = [type(u.module).__name__ for _, u in fsdp_units(wrapped)]

    # last: drift in rank 1's spectral entries (buffers are replicated, not sharded)
    if rank == 1:
        fsdp.module.backbone.blocks[0].fc1.adapter.a_indices[0, 0] += 1  # via FSDP getattr
    try:
        AdapterSyncCheckHook().after_train(_runner(fsdp, work, []))
    except RuntimeError as err:
        facts["drift_error"] = str(err)
    return facts


def _worker(rank: int, port: int, work: str, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        results.put((rank, "ok", _checks(rank, Path(work))))
    except BaseException:  # report it: the parent would otherwise wait on the queue
        results.put((rank, "error", traceback.format_exc()))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def facts(tmp_path_factory) -> dict[int, dict]:
    work = tmp_path_factory.mktemp("fsdp")
    results = mp.get_context("spawn").Queue()
    procs = mp.start_processes(
        _worker, (_free_port(), str(work), results), nprocs=2, join=False, start_method="spawn"
    )
    out: dict[int, dict] = {}
    errors = []
    for _ in range(2):
        rank, kind, value = results.get(timeout=300)
        if kind == "ok":
            out[rank] = value
        else:
            errors.append(f"rank {rank}:\n{value}")
    while not procs.join(timeout=120):
        pass
    assert not errors, "\n".join(errors)
    return out


def test_wrap_policy_keeps_frozen_and_trainable_parameters_apart(facts):
    units = facts[0]["units"]
    root, rest = units[0], units[1:]
    assert root[0] == ""  # FSDP's root: necks, heads and the leftovers
    assert all(len(kinds) == 1 for _, _, kinds in rest), rest  # no mixed unit below it
    by_kind = {}
    for name, cls, kinds in rest:
        by_kind.setdefault(cls, []).append((name, kinds))
    assert len(by_kind["FoRA"]) == 5 and all(k == [True] for _, k in by_kind["FoRA"])
    assert [n for n, _ in by_kind["FsdpToyBlock"]] == ["backbone.blocks.0", "backbone.blocks.1"]
    assert all(k == [False] for _, k in by_kind["FsdpToyBlock"])  # frozen blocks, no grads
    assert by_kind["AdaptedLinear"] and all(k == [False] for _, k in by_kind["AdaptedLinear"])
    flora = facts[0]["flora_units"]
    assert "ParameterList" not in flora and flora.count("FLoRA") == 2, flora


def test_batched_spectra_step_aside_inside_fsdp_units(facts):
    for rank in (0, 1):
        assert facts[rank]["batched"] == (True, False)


def test_trainable_table_counts_unsharded_parameters(facts):
    for rank in (0, 1):
        table = facts[rank]["table"]
        assert table.startswith(facts[rank]["reference_table"] + "\n"), table
        assert table.splitlines()[-1].startswith("FSDP units: ")
        assert facts[rank]["shard_table"] != facts[rank]["reference_table"]  # the bug


def test_sync_check_compares_gathered_tensors_and_catches_drift(facts):
    for rank in (0, 1):
        n = facts[rank]["adapter_keys"]
        assert facts[rank]["sync_log"] == (
            f"AdapterSyncCheckHook: {n} adapter tensors identical on all 2 ranks after 2 iterations"
        )
        assert "adapters differ across ranks" in facts[rank]["drift_error"]


def test_adapter_file_from_fsdp_is_the_unsharded_state(facts):
    f = facts[0]
    assert f["file_keys"] == f["expected_keys"]
    assert f["file_mismatch"] == []  # every tensor equals FSDP's own full state dict
    assert f["file_adapters"] and all(".adapter." in k for k in f["file_adapters"])
    assert f["file_meta_prefixes"] == ["backbone"]  # no _fsdp_wrapped_module in names
    assert f["file_fingerprint"] == f["expected_fingerprint"]  # gathered from the shards


def test_merge_from_a_sharded_checkpoint_directory(facts):
    f = facts[0]
    assert f["sharded_mismatch"] == [] and f["sharded_from"] == 2
    assert f["sharded_meta"] == {"iter": 2}
    assert f["merged_gap"] < 1e-5  # the plain model + merged weights = the adapted model
    assert f["merged_weight_change"] > 1e-3  # and ΔW was folded in: not the base weight
    assert "do not make the model's" in f["one_rank_error"]


def test_merge_at_end_and_delta_stats_see_whole_tensors(facts):
    f = facts[0]
    assert f["merged_end_keys_equal"] and f["merged_end_gap"] < 1e-6
    assert f["delta_stats"] == pytest.approx(f["reference_delta_stats"], rel=1e-5)
    assert f["delta_stats"]["delta_norm"] > 0
