"""Two-process runs on the CPU with gloo, as a user starts them (issue 12, items 9-10).

``MM_SPECTRAL_DIST_BACKEND=gloo bash tools/dist_train.sh CONFIG 2`` trains a tiny UperNet
(ConvNeXt-V2-atto + FoRA, mmseg) on generated shapes for 2 iterations, then ``--resume``
goes on to 4; once with DDP (the Runner, ``launcher='pytorch'``) and once with FSDP
(FlexibleRunner + FSDPStrategy, ``frozen_apart_wrap_policy``, sharded checkpoints). Each
checks that the ranks agreed (AdapterSyncCheckHook's log), that the resume restored the
optimizer, and that ``tools/merge_adapters.py`` gives a checkpoint that loads strictly
into the adapter-free config and reproduces the adapted model's outputs. Then the FSDP
benchmark's CPU smoke mode, with OpenMMLab imports blocked as on the GPU machine.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("mmseg")

from mmengine.config import Config  # noqa: E402

from mm_spectral.distributed import read_sharded_checkpoint  # noqa: E402
from mm_spectral.distributed.sharded_checkpoint import load_rank_file  # noqa: E402
from mm_spectral.openmmlab import (
    build_model,  # noqa: E402
    distributed,  # noqa: E402
)
from mm_spectral.openmmlab.checkpoint import adapter_tensors  # noqa: E402
from mm_spectral.openmmlab.distributed import (  # noqa: E402
    configure_distributed,
    finish_distributed,
)
from mm_spectral.state import load_checkpoint_file  # noqa: E402
from tools import merge_adapters  # noqa: E402
from tools.data.synthetic_shapes import make_shapes_ade  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs/demo/upernet_convnextv2-atto-flora_1xb8-shapes-ade.py"
TIMEOUT = 300  # seconds per launch; a launch takes ~20 s on two idle cores


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapes_ade")
    make_shapes_ade(root, num_train=4, num_val=2, img_size=(64, 64), seed=0)
    return root


def tiny_config(data_root: Path, path: Path, fsdp: bool) -> Path:
    """The demo UperNet at 64², 2 images per rank, FoRA, a checkpoint every 2 iterations,
    no validation; the sync check on. ``fsdp``: FlexibleRunner + FSDPStrategy."""
    cfg = Config.fromfile(str(DEMO))
    adapter = cfg.model.backbone.adapter
    cfg.model.backbone.adapter = dict(
        type="FoRA", rank=4, n=24, scale=2.0, seed=1, targets=adapter.targets
    )
    cfg.model.data_preprocessor.size = (64, 64)
    cfg.model.decode_head.channels = 16
    cfg.model.auxiliary_head.channels = 8
    train = cfg.train_dataloader
    train.dataset.data_root = str(data_root)
    train.batch_size, train.num_workers, train.persistent_workers = 2, 0, False
    train.dataset.pipeline[2] = dict(
        type="RandomResize", scale=(128, 64), ratio_range=(0.5, 1.5), keep_ratio=True
    )
    train.dataset.pipeline[3] = dict(type="RandomCrop", crop_size=(64, 64))
    cfg.val_dataloader = cfg.val_cfg = cfg.val_evaluator = None
    cfg.test_dataloader = cfg.test_cfg = cfg.test_evaluator = None
    cfg.train_cfg = dict(type="IterBasedTrainLoop", max_iters=2)
    cfg.param_scheduler = []
    cfg.default_hooks.checkpoint.interval = 2
    cfg.default_hooks.logger.interval = 1
    cfg.default_hooks.pop("visualization")
    cfg.custom_hooks = [dict(type="AdapterHook"), dict(type="AdapterSyncCheckHook")]
    if fsdp:
        cfg.runner_type = "FlexibleRunner"
        policy = dict(
            type="frozen_apart_wrap_policy", min_num_params=2000, module_classes=["ConvNeXtBlock"]
        )
        cfg.strategy = dict(type="FSDPStrategy", model_wrapper=dict(auto_wrap_policy=policy))
    cfg.dump(str(path))
    return path


def dist_train(config: Path, work_dir: Path, *options: str) -> str:
    """``bash tools/dist_train.sh CONFIG 2 ...`` with gloo on a free port; its output."""
    env = dict(
        os.environ,
        PYTHON=sys.executable,
        PORT=str(_free_port()),
        MM_SPECTRAL_DIST_BACKEND="gloo",
        OMP_NUM_THREADS="1",
    )
    cmd = ["bash", str(ROOT / "tools/dist_train.sh"), str(config), "2", "--work-dir"]
    done = subprocess.run(
        [*cmd, str(work_dir), *options],
        env=env,
        cwd=work_dir.parent,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-6000:]
    return out


def train_and_resume(config: Path, work: Path) -> tuple[str, str]:
    first = dist_train(config, work)
    resumed = dist_train(config, work, "--resume", "--cfg-options", "train_cfg.max_iters=4")
    for log, iters in ((first, 2), (resumed, 4)):
        assert f"adapter tensors identical on all 2 ranks after {iters} iterations" in log
    assert "resumed epoch: 0, iter: 2" in resumed
    return first, resumed


def check_merge(config: Path, checkpoint: Path, adapted_state: dict, out_dir: Path) -> None:
    """Merge with the tool; the plain config's model with the merged weights (strict)
    gives the adapted model's logits."""
    ckpt_path, cfg_path = merge_adapters.main(
        [str(config), str(checkpoint), "--out-dir", str(out_dir)]
    )
    cfg = Config.fromfile(str(config))
    adapted = build_model(cfg)
    adapted.load_state_dict(adapted_state, strict=True)
    plain_cfg = Config.fromfile(cfg_path)
    assert "AdaptedBackbone" not in str(plain_cfg.model)
    assert "strategy" not in plain_cfg and "runner_type" not in plain_cfg  # one device
    plain = build_model(plain_cfg)
    plain.load_state_dict(load_checkpoint_file(ckpt_path)["state_dict"], strict=True)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    adapted.eval(), plain.eval()
    with torch.no_grad():
        want, got = adapted(x, mode="tensor"), plain(x, mode="tensor")
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_ddp_with_gloo_trains_resumes_and_merges(data_root, tmp_path):
    config = tiny_config(data_root, tmp_path / "ddp.py", fsdp=False)
    work = tmp_path / "work"
    train_and_resume(config, work)
    final = load_checkpoint_file(str(work / "iter_4.pth"))
    steps = {float(s["step"]) for s in final["optimizer"]["state"].values()}
    assert steps == {4.0}  # AdamW's state came back: a fresh one would count 2
    assert (work / "iter_2_adapter.pth").is_file() and (work / "iter_4_adapter.pth").is_file()
    check_merge(config, work / "iter_4.pth", final["state_dict"], tmp_path / "merged")


def test_fsdp_with_gloo_trains_resumes_and_merges_sharded_checkpoints(data_root, tmp_path):
    config = tiny_config(data_root, tmp_path / "fsdp.py", fsdp=True)
    work = tmp_path / "work"
    first, _ = train_and_resume(config, work)
    assert "FSDP units: " in first and "total trainable" in first  # full counts + units
    final = work / "iter_4.pth"
    assert sorted(p.name for p in final.iterdir()) == ["rank0.pth", "rank1.pth"]
    for rank in (0, 1):
        state = load_rank_file(final / f"rank{rank}.pth")["optimizer"]["state"]
        assert {float(s["step"]) for s in state.values()} == {4.0}
    like = build_model(Config.fromfile(str(config))).state_dict()
    full = read_sharded_checkpoint(final, like)["state_dict"]
    # the adapter-only file beside the sharded directory holds the unsharded tensors
    adapter_file = adapter_tensors(load_checkpoint_file(str(work / "iter_4_adapter.pth")))
    assert any(".adapter." in key for key in adapter_file)
    for key, tensor in adapter_file.items():
        assert torch.equal(tensor, full[key]), key
    check_merge(config, final, full, tmp_path / "merged")


def test_cpu_without_gloo_names_the_switch(monkeypatch):
    """On a machine without GPUs, NCCL is refused with the switch to use (before any
    process group), instead of MMEngine's 'Found no NVIDIA driver'."""
    monkeypatch.delenv("MM_SPECTRAL_DIST_BACKEND", raising=False)
    monkeypatch.setattr(distributed, "get_device", lambda: "cpu")
    cfg = Config(dict(launcher="pytorch", env_cfg=dict(dist_cfg=dict(backend="nccl"))))
    with pytest.raises(RuntimeError, match="MM_SPECTRAL_DIST_BACKEND=gloo"):
        configure_distributed(cfg)


def test_cpu_wrappers_stay_on_the_cpu(monkeypatch):
    """What configure_distributed sets besides the process group (which exists already
    here, as it would after a first call): DDP without device ids, FSDP on 'cpu'."""
    monkeypatch.setenv("MM_SPECTRAL_DIST_BACKEND", "gloo")
    monkeypatch.setattr(distributed, "get_device", lambda: "cpu")
    monkeypatch.setattr(distributed, "dist", SimpleNamespace(is_initialized=lambda: True))
    ddp = Config(dict(launcher="pytorch", find_unused_parameters=True))
    configure_distributed(ddp)
    assert ddp.env_cfg.dist_cfg.backend == "gloo"
    assert ddp.model_wrapper_cfg == dict(
        type="MMDistributedDataParallel",
        broadcast_buffers=False,
        find_unused_parameters=True,
        device_ids=None,
    )
    fsdp = Config(
        dict(
            launcher="pytorch",
            runner_type="FlexibleRunner",
            strategy=dict(type="FSDPStrategy", model_wrapper=dict(use_orig_params=True)),
        )
    )
    configure_distributed(fsdp)
    assert fsdp.strategy.model_wrapper == dict(
        type="MMFullyShardedDataParallel", device_id="cpu", use_orig_params=True
    )


def test_finish_distributed_waits_and_leaves_gloo_to_the_exit(tmp_path, monkeypatch):
    """The entry points end a run with ``finish_distributed``: outside a group it does
    nothing; in a gloo group it waits for every rank and keeps the group (its teardown
    beside the peers' could abort a rank), so that ``leave_if_distributed`` exits."""
    monkeypatch.setattr(distributed, "_finished_group", False)  # restored after the test
    finish_distributed()
    assert not distributed._finished_group  # no group: leave_if_distributed returns
    distributed.leave_if_distributed()
    store = f"file://{tmp_path / 'store'}"
    torch.distributed.init_process_group("gloo", init_method=store, rank=0, world_size=1)
    try:
        finish_distributed()
        assert torch.distributed.is_initialized() and distributed._finished_group
    finally:
        torch.distributed.destroy_process_group()


BLOCK_OPENMMLAB = """
import importlib.abc, sys
BLOCKED = ("mmengine", "mmcv", "mmdet", "mmseg", "mmrotate", "cv2")
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"blocked import of {name}")
        return None
sys.meta_path.insert(0, _Block())
"""


def test_fsdp_benchmark_smoke_run_needs_only_torch_and_timm(tmp_path):
    """``tools/benchmark_fsdp.py --tiny --device cpu`` on 2 processes, every OpenMMLab
    import blocked (a sitecustomize on PYTHONPATH) as on the GPU machine."""
    (tmp_path / "sitecustomize.py").write_text(BLOCK_OPENMMLAB)
    env = dict(os.environ, PYTHONPATH=str(tmp_path), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    cmd += ["--master_port", str(_free_port()), str(ROOT / "tools/benchmark_fsdp.py")]
    cmd += ["--tiny", "--device", "cpu", "--steps", "2", "--warmup", "1"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-6000:]
    assert "all trainable, FSDP FULL_SHARD on 2 x cpu" in out
    assert "images/s: " in out
    for rank in (0, 1):
        assert f"rank {rank}: peak rss " in out


def _run_python(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_a_finished_rank_leaves_after_flushing_and_atexit(tmp_path):
    """leave_if_distributed: nothing outside a finished group; after one, the atexit
    callbacks run, the streams and the log file are flushed, and the exit code is kept."""
    code = """
import atexit, logging, sys
from mm_spectral.openmmlab import distributed
logging.basicConfig(filename=sys.argv[1])
distributed.leave_if_distributed(5)
print('still here', end='')
atexit.register(lambda: print(' | atexit ran', end=''))
logging.getLogger('t').warning('logged')
distributed._finished_group = True
distributed.leave_if_distributed(3)
print('not reached')
"""
    log = tmp_path / "run.log"
    done = _run_python(code, str(log))
    assert done.returncode == 3, done.stderr[-3000:]
    assert done.stdout == "still here | atexit ran"
    assert "logged" in log.read_text()


def test_a_rank_killed_by_a_signal_prints_its_python_stack():
    """report_crashes: SIGABRT (as the gloo teardown abort) prints the Python stack."""
    code = """
import os
from mm_spectral.distributed.process_exit import report_crashes
def where_it_died():
    os.abort()
report_crashes()
where_it_died()
"""
    done = _run_python(code)
    assert done.returncode != 0
    assert "Fatal Python error: Aborted" in done.stderr
    assert "where_it_died" in done.stderr
