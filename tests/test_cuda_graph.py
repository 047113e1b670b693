"""CUDA-graph replay of a training forward+backward: eager fallbacks (CPU) and, on a GPU,
equality of graphed and eager training."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

import mm_spectral
from mm_spectral.cuda_graph import CudaGraphForward, disable_cuda_graph, enable_cuda_graph

METHODS = {
    "LoRA": dict(type="LoRA", rank=4, alpha=8),
    "FLoRA": dict(type="FLoRA", rank=4, scale=2.0),
    "FourierFT": dict(type="FourierFT", n=40, alpha=10.0),
    "FoRA": dict(type="FoRA", rank=8, n=60, scale=1.0),
}


class TinyBackbone(nn.Module):
    """Stem conv, depthwise conv, a channel MLP on channels-last: returns two feature maps."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 4, stride=4)
        self.dw = nn.Conv2d(16, 16, 7, padding=3, groups=16)
        self.norm = nn.LayerNorm(16)
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        stem = self.stem(x)
        y = self.dw(stem).permute(0, 2, 3, 1)
        y = self.fc2(torch.nn.functional.gelu(self.fc1(self.norm(y))))
        return stem, stem + y.permute(0, 3, 1, 2)


def adapted(method: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = TinyBackbone()
    mm_spectral.inject(model, dict(METHODS[method], targets=["stem", "dw", "fc1", "fc2"]))
    with torch.no_grad():  # make every ΔW non-zero so the adapters matter
        for name, param in model.named_parameters():
            if ".adapter." in f".{name}":
                param.normal_(0, 0.2)
    return model


def test_cpu_eval_and_no_grad_calls_run_eagerly_with_identical_outputs():
    eager, graphed = adapted("FLoRA"), enable_cuda_graph(adapted("FLoRA"))
    x = torch.randn(2, 3, 16, 16)
    for train in (True, False):
        eager.train(train), graphed.train(train)
        for a, b in zip(eager(x), graphed(x)):
            torch.testing.assert_close(a, b)
    with torch.no_grad():
        torch.testing.assert_close(eager(x)[1], graphed(x)[1])
    assert graphed.forward.graphs == {}  # nothing was captured off the GPU


def test_enable_is_idempotent_and_disable_restores_the_class_forward():
    model = adapted("LoRA")
    runner = enable_cuda_graph(model).forward
    assert isinstance(runner, CudaGraphForward) and enable_cuda_graph(model).forward is runner
    disable_cuda_graph(model)
    assert "forward" not in model.__dict__ and model.forward.__func__ is TinyBackbone.forward


def test_copies_and_pickles_get_a_fresh_runner_bound_to_the_copy():
    model = enable_cuda_graph(adapted("FoRA"))
    x = torch.randn(1, 3, 16, 16)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        runner = clone.__dict__["forward"]
        assert isinstance(runner, CudaGraphForward) and runner.module is clone
        assert runner.graphs == {}
        torch.testing.assert_close(clone(x)[1], model(x)[1])


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


@cuda
@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_graphed_training_matches_eager(method, dtype):
    """Three SGD steps under autocast: each step's gradients, and the updated adapters.

    The captured backward may take another cuDNN kernel for a half-precision weight
    gradient than the eager one (seen on an H100: the depthwise conv's, bf16, within 0.3%
    of its largest entry, while every module's output was bit for bit eager's), so the
    gradients are compared at half precision's resolution. SGD, as AdamW would turn a
    near-zero gradient's rounding into a full-size update of either sign. A graph that
    replayed stale weights would miss by the size of an update (lr 0.1)."""
    eager = adapted(method).cuda()
    graphed = enable_cuda_graph(adapted(method).cuda())
    optims = [
        torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
        for m in (eager, graphed)
    ]
    torch.manual_seed(1)
    inputs = [torch.randn(2, 3, 32, 32, device="cuda") for _ in range(3)]
    for x in inputs:
        grads = []
        for model, optim in zip((eager, graphed), optims):
            optim.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=dtype):
                out = model(x)
            sum(o.float().square().mean() for o in out).backward()
            grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
            optim.step()
        for want, got in zip(*grads):
            assert want.abs().max() > 0
            assert (got - want).abs().max() <= 1e-2 * want.abs().max()
        for (name, a), b in zip(eager.named_parameters(), graphed.parameters()):
            if a.requires_grad:
                torch.testing.assert_close(b, a, rtol=2e-3, atol=2e-4, msg=name)
    assert len(graphed.forward.graphs) == 1


@cuda
def test_new_shapes_beyond_the_limit_merged_and_eval_run_eagerly():
    model = enable_cuda_graph(adapted("LoRA").cuda(), max_shapes=1)
    reference = copy.deepcopy(model)
    x, other = torch.randn(2, 3, 32, 32, device="cuda"), torch.randn(1, 3, 16, 16, device="cuda")
    model(x)[1].sum().backward()
    with pytest.warns(UserWarning, match="beyond max_shapes=1"):
        out = model(other)[1]
    torch.testing.assert_close(out, reference(other)[1])
    assert len(model.forward.graphs) == 1
    mm_spectral.merge(model)
    mm_spectral.merge(reference)
    torch.testing.assert_close(model(x)[1], reference(x)[1])  # merged: eager, not the graph
    model.eval(), reference.eval()
    torch.testing.assert_close(model(x)[1], reference(x)[1])


@cuda
def test_graphed_training_with_batched_linears_matches_eager(whole_deltas):
    """DoRA's and FLoRA's same-shape linears batch their whole ΔW from the second call on
    (their tokens known), when the plan would pack DoRA's W0 into one buffer: the graph
    captured at the first call keeps reading the weights it captured. Four AdamW steps
    under bf16 autocast equal eager training's."""
    from batched_checks import SameShapeLinears

    for method in ("DoRA", "FLoRA"):
        config = dict(type="DoRA", rank=3, alpha=6) if method == "DoRA" else METHODS["FLoRA"]
        models = []
        for _ in range(2):
            torch.manual_seed(0)
            model = SameShapeLinears(4)
            mm_spectral.inject(model, dict(config, targets=[r"fc\.\d"]))
            mm_spectral.enable_batched_spectra(model.cuda())
            models.append(model)
        eager, graphed = models[0], enable_cuda_graph(models[1])
        optims = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
                  for m in models]  # fmt: skip
        torch.manual_seed(1)
        for x in [torch.randn(2, 7, 16, device="cuda") for _ in range(4)]:
            for model, optim in zip((eager, graphed), optims):
                optim.zero_grad(set_to_none=True)
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    out = model(x)
                out.float().square().mean().backward()
                optim.step()
            torch.cuda.synchronize()
            for (name, a), b in zip(eager.named_parameters(), graphed.parameters()):
                if a.requires_grad:
                    torch.testing.assert_close(b, a, rtol=2e-3, atol=2e-4, msg=name)
        assert len(graphed.forward.graphs) == 1
