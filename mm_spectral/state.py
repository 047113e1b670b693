"""Adapter state: which keys are adapters', checked loading, merged state dicts, files.

Pure PyTorch. The adapter-only state dict of a module is exactly its keys that contain
an ``adapter`` component (``<layer>.adapter.<tensor>``); spectral entries are buffers and
travel with it.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import socket
import tempfile
import warnings
from collections import defaultdict
from collections.abc import Iterator, Mapping
from typing import IO, Any

import torch
from torch import Tensor, nn

from .adapters.base import AdaptedLayerMixin, Fold, is_adapted

ADAPTER_KEY = "adapter"
"""Name of the child module that holds a layer's adapter."""


def is_adapter_key(key: str) -> bool:
    """Whether a parameter / state-dict key belongs to an adapter ('<layer>.adapter.<x>')."""
    return f".{ADAPTER_KEY}." in f".{key}"


def adapted_layers(module: nn.Module) -> Iterator[tuple[str, AdaptedLayerMixin]]:
    """(name, layer) for every adapted layer of ``module``."""
    for name, layer in module.named_modules():
        if is_adapted(layer):
            yield name, layer  # type: ignore[misc]


@torch.no_grad()
def finite_folds(module: nn.Module) -> dict[str, Fold]:
    """{layer name: what merging writes there} for every unmerged adapted layer.

    The one place adapters are folded into weights (and biases): raises listing every
    layer whose result is not finite, so callers change nothing unless all of them are.
    """
    folds, bad = {}, []
    for name, layer in adapted_layers(module):
        if layer.merged:
            continue
        try:
            folds[name] = layer.fold()
        except ValueError:
            bad.append(name or "<root>")
    if bad:
        raise ValueError(f"ΔW is not finite in {bad}; nothing was merged")
    return folds


def adapter_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """Only the adapter tensors of ``module`` (spectral entries included)."""
    return {k: v for k, v in module.state_dict().items() if is_adapter_key(k)}


def base_dependent_keys(module: nn.Module) -> set[str]:
    """State-dict keys of adapter tensors derived from their base weight (DoRA's magnitude)."""
    keys = set()
    for name, layer in adapted_layers(module):
        prefix = f"{name}.{ADAPTER_KEY}." if name else f"{ADAPTER_KEY}."
        keys.update(prefix + key for key in layer.adapter.base_dependent)
    return keys


@torch.no_grad()
def merged_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """The plain state dict (CPU) with every adapter folded in, leaving ``module`` untouched."""
    state = module.state_dict()
    for name, fold in finite_folds(module).items():
        prefix = f"{name}." if name else ""
        if fold.weight is not None:
            state[f"{prefix}weight"] = fold.weight
        if fold.bias is not None:
            state[f"{prefix}bias"] = fold.bias
    return {k: v.detach().cpu() for k, v in state.items() if not is_adapter_key(k)}


def load_adapter_state_dict(module: nn.Module, state: Mapping[str, Tensor]) -> None:
    """Load adapter tensors after checking that they fit, layer by layer; all-or-nothing.

    Checks per layer: the model has an adapter there, the keys are the method's, shapes
    agree, and each method's ``fixed_buffers`` (spectral entries) equal the model's.
    """
    own_layers = _group_by_layer(adapter_state_dict(module))
    new_layers = _group_by_layer(state)
    problems: list[str] = []
    for layer in sorted(set(own_layers) | set(new_layers)):
        mine, theirs = own_layers.get(layer, {}), new_layers.get(layer, {})
        if not mine:
            problems.append(f"'{layer}': the model has no adapter there")
        elif not theirs:
            problems.append(f"'{layer}': the state has no tensors for its adapter")
        else:
            problems += _layer_problems(layer, _adapter_at(module, layer), mine, theirs)
    if problems:
        raise ValueError("adapter state does not fit the model:\n  " + "\n  ".join(problems))
    module.load_state_dict(dict(state), strict=False)


def _layer_problems(
    layer: str, adapter: nn.Module, mine: Mapping[str, Tensor], theirs: Mapping[str, Tensor]
) -> list[str]:
    if set(mine) != set(theirs):
        return [
            f"'{layer}': state keys {sorted(theirs)} do not fit the model's {adapter.method} "
            f"adapter (keys {sorted(mine)}); was it saved from another method?"
        ]
    problems = []
    for key, tensor in theirs.items():
        if tuple(tensor.shape) != tuple(mine[key].shape):
            problems.append(
                f"'{layer}': {key} has shape {tuple(tensor.shape)}, "
                f"the model's is {tuple(mine[key].shape)}"
            )
        elif key in adapter.fixed_buffers and not torch.equal(tensor.cpu(), mine[key].cpu()):
            problems.append(
                f"'{layer}': spectral entries {key} differ from the model's (fixed at "
                f"construction: saved with another seed, n or layer shape?)"
            )
    return problems


def _group_by_layer(state: Mapping[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """{layer name: {adapter tensor name: tensor}} from '<layer>.adapter.<tensor>' keys."""
    grouped: dict[str, dict[str, Tensor]] = defaultdict(dict)
    for key, tensor in state.items():
        layer, sep, name = key.rpartition(f".{ADAPTER_KEY}.")
        if not sep:  # the root module itself is the adapted layer: 'adapter.<tensor>'
            layer, name = "", key.removeprefix(f"{ADAPTER_KEY}.")
        grouped[layer][name] = tensor
    return grouped


def _adapter_at(module: nn.Module, layer_name: str) -> nn.Module:
    return module.get_submodule(layer_name).adapter if layer_name else module.adapter


# ----------------------------------------------------------------------------- files


def load_checkpoint_file(
    file: str | os.PathLike | IO[bytes],
    map_location: Any = "cpu",
    trusted: bool = True,
    mmap: bool = False,
) -> Any:
    """The one way this project reads a torch checkpoint.

    First with ``weights_only=True`` (tensors, containers and the globals registered with
    ``torch.serialization.add_safe_globals``, e.g. MMEngine's by ``mm_spectral.openmmlab``).
    A file that needs other globals is then fully unpickled if ``trusted`` (a file the
    user chose; a warning names the global), else refused. ``mmap`` maps a zip-format file
    instead of reading it (a 6B checkpoint then costs no second copy in memory); only for
    read-only use, since the tensors stay backed by the file.
    """
    try:
        return _torch_load(file, map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        if not trusted:
            raise pickle.UnpicklingError(
                f"{_describe(file)} holds more than tensors and known types; if you trust the "
                f"file, load it with trusted=True (tools: --trust-pickle). {err}"
            ) from None
        warnings.warn(
            f"{_describe(file)}: not loadable with weights_only=True ({_first_line(err)}); "
            "unpickling it fully because it was chosen explicitly",
            stacklevel=2,
        )
        if hasattr(file, "seek"):
            file.seek(0)
        return _torch_load(file, map_location, weights_only=False, mmap=mmap)


def _torch_load(file: Any, map_location: Any, weights_only: bool, mmap: bool) -> Any:
    if mmap and isinstance(file, (str, os.PathLike)):
        try:
            return torch.load(file, map_location, weights_only=weights_only, mmap=True)
        except RuntimeError as err:  # legacy (non-zip) serialisation cannot be memory-mapped
            if "mmap" not in str(err):
                raise
    return torch.load(file, map_location, weights_only=weights_only)


def _describe(file: Any) -> str:
    return os.fspath(file) if isinstance(file, (str, os.PathLike)) else "the checkpoint"


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path`` for writing; on success flush, fsync and
    rename it to ``path``, else delete it: a kill or a full disk never leaves a truncated
    file under the final name (a rename within one directory is atomic).

    A process killed mid-write (SIGKILL) cannot delete its temporary; the next write of
    the same path removes such leftovers of dead processes of this host.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    prefix = _temporary_prefix(path)
    _remove_stale_temporaries(directory, prefix)
    fd, tmp = tempfile.mkstemp(prefix=f"{prefix}{os.getpid()}.", suffix=".tmp", dir=directory)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would hide the file from others
        with open(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _temporary_prefix(path: str) -> str:
    """'.<name>.<host>.' : temporaries of ``path`` written on this host (then the pid)."""
    return f".{os.path.basename(path)}.{socket.gethostname()}."


def _remove_stale_temporaries(directory: str, prefix: str) -> None:
    for name in os.listdir(directory):
        if not (name.startswith(prefix) and name.endswith(".tmp")):
            continue
        pid = name[len(prefix) :].split(".", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(directory, name))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` through :func:`atomic_open`."""
    with atomic_open(path) as handle:
        torch.save(obj, handle)


def atomic_write_text(text: str, path: str | os.PathLike) -> None:
    """Write ``text`` (UTF-8) to ``path`` through :func:`atomic_open`."""
    with atomic_open(path, "w") as handle:
        handle.write(text)
