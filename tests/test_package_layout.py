"""The boundary between the torch-only core and the OpenMMLab layer, checked by running it.

- The core (``import mm_spectral``: inject, merge, state dicts) works on a plain
  ``nn.Module`` in a process where OpenMMLab, timm and OpenCV cannot be imported at all.
- No module of the package imports (directly or through others) a module that imports it.
- Every module of the package is reached from one of its two entry points, so no file in
  it exists only for tools or tests.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mm_spectral"
ENTRY_POINTS = ("mm_spectral", "mm_spectral.openmmlab")
BLOCKED = ("mmengine", "mmcv", "mmdet", "mmseg", "mmrotate", "timm", "cv2")


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_core_works_with_openmmlab_timm_and_opencv_blocked():
    done = run_python(
        f"""
        import importlib.abc, sys

        BLOCKED = {BLOCKED!r}

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split('.')[0] in BLOCKED:
                    raise ImportError(f'blocked import of {{name}}')
                return None

        sys.meta_path.insert(0, Block())
        import torch
        from torch import nn
        import mm_spectral

        model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1))
        names = mm_spectral.inject(model, dict(type='FLoRA', rank=2, targets=[r'\\d']))
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.normal_(0, 0.1)  # a modest ΔW, as after training
        x = torch.randn(2, 3, 8, 8)
        adapted = model(x)
        state = mm_spectral.adapter_state_dict(model)
        merged = mm_spectral.merged_state_dict(model)
        mm_spectral.merge(model)
        assert torch.allclose(model(x), adapted, rtol=1e-4, atol=1e-5)
        mm_spectral.remove_adapters(model, merge_first=False)
        plain = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1))
        plain.load_state_dict(merged, strict=True)
        assert torch.allclose(plain(x), adapted, rtol=1e-4, atol=1e-5)
        loaded = [m for m in sys.modules if m.split('.')[0] in BLOCKED]
        assert not loaded, loaded
        print('OK', names, len(state))
        """
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("OK ['0', '2'] 10")


def test_old_custom_imports_name_still_registers_the_openmmlab_layer():
    """Configs written before the split say ``custom_imports=['mm_spectral']``."""
    done = run_python(
        """
        from mmengine.config import Config
        from mmengine.registry import HOOKS, MODELS
        cfg = Config(dict(custom_imports=dict(imports=['mm_spectral'])))
        from mmengine.utils import import_modules_from_strings
        import_modules_from_strings(**cfg.custom_imports)
        assert 'AdaptedBackbone' in MODELS.module_dict
        assert 'AdapterHook' in HOOKS.module_dict
        print('OK')
        """
    )
    assert done.returncode == 0, done.stderr[-3000:]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Package modules that ``name`` imports anywhere in its file (function bodies too)."""
    is_package = path.name == "__init__.py"
    base = name.split(".") if is_package else name.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            parent = base[: len(base) - node.level + 1] if node.level else []
            module = ".".join(parent + ([node.module] if node.module else []))
            targets = [module] + [f"{module}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {t for t in targets if t in known and t != name}
    # Importing a.b.c first runs package a.b: an edge to it too, unless a.b encloses this
    # module (its own packages are initialising already; that is how packages work).
    parents = {".".join(t.split(".")[:i]) for t in found for i in range(1, t.count(".") + 1)}
    found |= {p for p in parents if p in known and not f"{name}.".startswith(f"{p}.")}
    return found


def import_graph() -> dict[str, set[str]]:
    modules = package_modules()
    known = set(modules)
    return {name: imports_of(name, path, known) for name, path in modules.items()}


def test_no_import_cycles():
    graph = import_graph()
    assert graph["mm_spectral"] and graph["mm_spectral.openmmlab"]  # the parser sees imports
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycle = stack[stack.index(nxt) :] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_every_package_module_is_reached_from_an_entry_point():
    graph = import_graph()
    reached, todo = set(), list(ENTRY_POINTS)
    while todo:
        node = todo.pop()
        if node not in reached:
            reached.add(node)
            todo.extend(graph[node])
    orphans = sorted(set(graph) - reached)
    assert not orphans, f"modules only tools or tests can reach: {orphans}"
