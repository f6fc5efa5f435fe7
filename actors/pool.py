"""Adapter residency and stacked storage: the whole pool on one device, laid out for the mixture.

For every base module that at least one adapter adapts, the pool keeps all adapters' factors
concatenated along the rank axis, with each adapter's scale folded into its B columns:

    A_cat (R, d_in)    rows    [start_i, start_i + r_i) are A_i
    B_cat (d_out, R)   columns [start_i, start_i + r_i) are c_i * B_i

so the delta of adapter i at that module is `B_cat[:, cols_i] @ (A_cat[cols_i] @ x)`. An adapter that
does not adapt the module has r_i = 0 there. Adapters are kept sorted by name: index order is name
order, which is what makes routing ties deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from actors.adapters import Adapter, AdapterError, read_adapter, resolve_sources, validate_adapter
from actors.index import RoutingIndex

INDEX_MODULES = ("q_proj", "v_proj")  # modules the routing index holds by default (the default probe)


@dataclass(frozen=True)
class StackedModule:
    """All adapters' factors at one base module, concatenated along the rank axis."""

    A: torch.Tensor  # (R, d_in)
    B: torch.Tensor  # (d_out, R), scale folded in
    ranks: tuple[int, ...]  # per pool adapter; 0 where the adapter does not adapt this module
    starts: tuple[int, ...]  # per pool adapter; first column of its block


def _check_range(adapter: Adapter, dtype: torch.dtype) -> None:
    """Refuse an adapter whose factors (B with its scale folded in) do not fit in the pool's dtype."""
    limit = torch.finfo(dtype).max
    for module, f in adapter.factors.items():
        largest = max(float(f.A.abs().max()), float(f.B.abs().max()) * abs(f.scale))
        if not largest <= limit:
            raise AdapterError(
                f"adapter {adapter.name!r}: module {module!r} has a factor entry of {largest:.3g} (lora_A, or "
                f"lora_B times its scale), beyond the largest {str(dtype).removeprefix('torch.')} value "
                f"({limit:.3g}); the adapter's weights diverged, or use a wider dtype (float32)")


class AdapterPool:
    """A validated pool of LoRA adapters for one base model, stacked per module on one device."""

    def __init__(self, adapters: list[Adapter], model: nn.Module, dtype: torch.dtype, device: torch.device,
                 index_modules: tuple[str, ...] = INDEX_MODULES, index_with_B: bool = False):
        if not adapters:
            raise AdapterError("the adapter pool is empty; LoGo needs at least one adapter")
        for adapter in adapters:
            validate_adapter(adapter, model)
            _check_range(adapter, dtype)
        adapters = sorted(adapters, key=lambda a: a.name)
        self.names: tuple[str, ...] = tuple(a.name for a in adapters)
        self.paths: tuple[Path, ...] = tuple(a.path for a in adapters)
        self.dtype, self.device = dtype, device
        self._index = {name: i for i, name in enumerate(self.names)}
        self.modules: dict[str, StackedModule] = {}
        for module in sorted({m for a in adapters for m in a.factors}):
            ranks = tuple(a.factors[module].rank if module in a.factors else 0 for a in adapters)
            starts = tuple(sum(ranks[:i]) for i in range(len(ranks)))
            present = [a.factors[module] for a in adapters if module in a.factors]
            A = torch.cat([f.A for f in present], dim=0)  # (R, d_in)
            B = torch.cat([f.B * f.scale for f in present], dim=1)  # (d_out, R)
            self.modules[module] = StackedModule(
                A=A.to(device=device, dtype=dtype).contiguous(),
                B=B.to(device=device, dtype=dtype).contiguous(),
                ranks=ranks,
                starts=starts,
            )
        # Routing reads float32 factors as read from the files, not the stack's (possibly bf16) copy.
        self.routing_index = RoutingIndex(adapters, tuple(index_modules), index_with_B, device)

    @classmethod
    def load(
        cls,
        adapters: str | Path | Mapping[str, str | Path],
        model: nn.Module,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        index_modules: tuple[str, ...] = INDEX_MODULES,
        index_with_B: bool = False,
    ) -> "AdapterPool":
        """Read, validate and stack a pool: a directory of adapter directories, or name -> path.

        `index_modules`: module names (last path component) whose float32 probe factors the routing
        index keeps, at every block; `index_with_B`: keep B too (the entropy signal needs it)."""
        sources = resolve_sources(adapters)
        return cls([read_adapter(name, path, model) for name, path in sources.items()], model, dtype,
                   torch.device(device), index_modules, index_with_B)

    def __len__(self) -> int:
        return len(self.names)

    def index(self, name: str) -> int:
        return self._index[name]

    @property
    def nbytes(self) -> int:
        """Device memory held by the stacked factors."""
        return sum(s.A.nbytes + s.B.nbytes for s in self.modules.values())

    def describe(self) -> str:
        ranks = sorted({r for s in self.modules.values() for r in s.ranks if r})
        return (f"{len(self)} adapters over {len(self.modules)} modules, ranks {ranks}, "
                f"{self.nbytes / 2**20:.1f} MiB on {self.device} ({self.dtype}); routing index "
                f"{self.routing_index.nbytes / 2**20:.1f} MiB (float32, {', '.join(self.routing_index.modules)})")

    def columns(self, module: str, union: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Columns of `module`'s stacked factors that belong to the adapters in `union`.

        Returns `cols` (C,) into A_cat rows / B_cat columns, and `owner` (C,) with, for each column,
        the position in `union` of the adapter it belongs to. Adapters absent at `module` add none.
        """
        s = self.modules[module]
        cols, owner = [], []
        for pos, i in enumerate(union):
            cols.extend(range(s.starts[i], s.starts[i] + s.ranks[i]))
            owner.extend([pos] * s.ranks[i])
        return (torch.tensor(cols, dtype=torch.long, device=self.device),
                torch.tensor(owner, dtype=torch.long, device=self.device))
