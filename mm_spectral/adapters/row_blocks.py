"""Adapters on row blocks of one Linear: e.g. query and value of timm's fused ``qkv``.

The FourierFT and FoRA papers adapt query and value only; timm's ViT computes q, k, v
with one Linear of 3·d output rows. ``row_blocks=dict(split=3, use=(0, 2))`` in an adapter
config gives each used block of d rows its own adapter of shape (d, in), of any method,
with ΔW (and Δb) zero on the other rows.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import BaseAdapter, LayerSpec, LowRankAdapter
from .functional import low_rank_linear


class RowSlice(NamedTuple):
    """The weight and bias rows of one block, standing in for the layer in a block's forward."""

    weight: Tensor
    bias: Tensor | None


class RowBlocks(BaseAdapter):
    """ΔW = [ΔW₀; ΔW₁; …] over ``split`` blocks of rows, ΔW_i the adapter of block i if i is
    in ``use``, else 0.

    Forward: additive low-rank methods (LoRA, FLoRA, FoRA) run as one factored op, the
    blocks' factors stacked (down = [A_i], up block-placed); other additive methods
    (FourierFT) run one op with W0 + ΔW; DoRA and BitFit run each block's own forward on
    its rows and concatenate. Merging folds block by block.

    Args:
        spec: the adapted Linear.
        split: number of equal row blocks (3 for q, k, v).
        use: indices of the adapted blocks (e.g. (0, 2): query and value).
        build: makes the adapter of one block from its spec (rows/split, in).
    """

    def __init__(
        self,
        spec: LayerSpec,
        split: int,
        use: tuple[int, ...],
        build: Callable[[LayerSpec], BaseAdapter],
    ) -> None:
        super().__init__(spec)
        out, fan_in = spec.weight_shape
        self.split, self.use, self.rows = split, tuple(sorted(use)), out // split
        self.blocks = nn.ModuleDict(
            {
                str(i): build(
                    LayerSpec(
                        f"{spec.name} rows {i * self.rows}:{(i + 1) * self.rows}",
                        "linear",
                        (self.rows, fan_in),
                        bias=spec.bias,
                    )
                )
                for i in self.use
            }
        )
        adapters = list(self.blocks.values())
        # Instance attributes in place of the class-level ones: they describe the blocks.
        self.method = adapters[0].method  # type: ignore[misc]
        self.additive = all(a.additive for a in adapters)  # type: ignore[misc]
        self.fixed_buffers = self._block_keys("fixed_buffers")  # type: ignore[misc]
        self.base_dependent = self._block_keys("base_dependent")  # type: ignore[misc]
        self.low_rank = self.additive and all(
            isinstance(a, LowRankAdapter) and a.factored for a in adapters
        )

    @classmethod
    def from_config(
        cls, spec: LayerSpec, cfg: Any, build: Callable[[LayerSpec], BaseAdapter]
    ) -> RowBlocks:
        """Validate ``row_blocks=dict(split=S, use=(i, …))`` for one layer, then build."""
        where = f"row_blocks on layer '{spec.name}'"
        if spec.kind != "linear":
            raise ValueError(
                f"{where}: row blocks apply to nn.Linear, the layer is {spec.type_label}"
            )
        if not isinstance(cfg, Mapping) or set(cfg) != {"split", "use"}:
            raise ValueError(f"{where}: expected dict(split=S, use=(i, ...)), got {cfg!r}")
        split, use = cfg["split"], cfg["use"]
        out = spec.weight_shape[0]
        if not isinstance(split, int) or split < 1 or out % split:
            raise ValueError(f"{where}: split={split!r} must be a positive divisor of {out} rows")
        use = (use,) if isinstance(use, int) else tuple(use)
        if (
            not use
            or len(set(use)) != len(use)
            or not all(isinstance(i, int) and 0 <= i < split for i in use)
        ):
            raise ValueError(
                f"{where}: use={cfg['use']!r} must name distinct blocks in 0..{split - 1}"
            )
        return cls(spec, split, use, build)

    def _block_keys(self, attr: str) -> tuple[str, ...]:
        return tuple(
            f"blocks.{i}.{name}" for i, a in self.blocks.items() for name in getattr(a, attr)
        )

    def _slices(self) -> list[tuple[slice, BaseAdapter | None]]:
        """(rows of block i, its adapter or None) for every block, in order."""
        return [
            (
                slice(i * self.rows, (i + 1) * self.rows),
                self.blocks[str(i)] if i in self.use else None,
            )
            for i in range(self.split)
        ]

    def _stack(self, parts: dict[int, Tensor]) -> Tensor:
        """Concatenate per-block tensors along rows, zeros for the unused blocks."""
        like = next(iter(parts.values()))
        return torch.cat([parts.get(i, like.new_zeros(like.shape)) for i in range(self.split)])

    def delta(self) -> Tensor:
        return self._stack({int(i): a.delta_weight() for i, a in self.blocks.items()})

    def delta_bias(self) -> Tensor | None:
        parts = {int(i): a.delta_bias() for i, a in self.blocks.items()}
        if all(p is None for p in parts.values()):
            return None
        return self._stack({i: p for i, p in parts.items() if p is not None})

    def low_rank_factors(self) -> tuple[Tensor, Tensor, float]:
        """down = [A_i] stacked (Σr, in); up (out, Σr) with block i's B_i (scale folded in)
        at its rows and its columns: up @ down is ΔW, zero on the unused rows."""
        factors = [a.low_rank_factors() for a in self.blocks.values()]  # type: ignore[operator]
        total = sum(down.shape[0] for down, _, _ in factors)
        ups, start = {}, 0
        for i, (down, up, scale) in zip(self.use, factors):
            up = up if scale == 1.0 else up * scale
            ups[i] = F.pad(up, (start, total - start - down.shape[0]))
            start += down.shape[0]
        return torch.cat([down for down, _, _ in factors]), self._stack(ups), 1.0

    def forward(self, x: Tensor, layer: nn.Module) -> Tensor:
        if self.low_rank:
            down, up, _ = self.low_rank_factors()
            return low_rank_linear(x, layer.weight, layer.bias, down, up, 1.0)
        if self.additive:
            return super().forward(x, layer)
        outputs = []
        for rows, adapter in self._slices():
            part = RowSlice(layer.weight[rows], None if layer.bias is None else layer.bias[rows])
            if adapter is None:
                outputs.append(F.linear(x, part.weight, part.bias))
            else:
                outputs.append(adapter.forward(x, part))  # type: ignore[arg-type]
        return torch.cat(outputs, dim=-1)

    def merged_weight(self, weight: Tensor) -> tuple[Tensor, Any]:
        if self.additive:
            return super().merged_weight(weight)
        pieces, memos = [], []
        for rows, adapter in self._slices():
            piece, memo = (
                (weight[rows], None) if adapter is None else adapter.merged_weight(weight[rows])
            )
            pieces.append(piece)
            memos.append(memo)
        return torch.cat(pieces), memos

    def unmerged_weight(self, weight: Tensor, memo: Any) -> Tensor:
        if self.additive:
            return super().unmerged_weight(weight, memo)
        return torch.cat(
            [
                weight[rows] if adapter is None else adapter.unmerged_weight(weight[rows], m)
                for (rows, adapter), m in zip(self._slices(), memo)
            ]
        )

    def reset_from_base(self, weight: Tensor) -> None:
        for rows, adapter in self._slices():
            if adapter is not None:
                adapter.reset_from_base(weight[rows])

    def size_warning(self) -> str | None:
        notes = [(i, a.size_warning()) for i, a in self.blocks.items()]
        notes = [f"row block {i}: {note}" for i, note in notes if note]
        return "; ".join(notes) or None

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, split={self.split}, use={self.use}"
