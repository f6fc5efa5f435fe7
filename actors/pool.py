"""The adapter pool: every adapter's identity and routing factors, and a bounded set of resident factors.

Adapters are read one at a time, in name order (index order is name order, which is what makes
routing ties deterministic): each is validated against the base model, its probe factors go into
the routing index (float32, small: see `actors.index`), and its full factors are dropped unless the
residency keeps them. The mixture asks for the full factors of a generate call's union with
`acquire`; with `max_resident` set, at most that many adapters (or bytes) stay on the device and
the others are read again from their files on demand, least recently used first out (see
`actors.residency`). Per adapter and module, the device holds

    A   (r, d_in)        in the pool's dtype
    cB  (d_out, r)       B with the adapter's scale folded in, in the pool's dtype

which is exactly what a fresh read gives, so which adapters happen to be resident never changes
an output.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch
from torch import nn

from actors.adapters import (CONFIG_FILE, WEIGHTS_FILE, Adapter, AdapterError, read_adapter, resolve_sources,
                             validate_adapter)
from actors.fingerprint import read_pinned
from actors.index import RoutingIndex
from actors.residency import Residency, ResidencyBound, parse_max_resident

INDEX_MODULES = ("q_proj", "v_proj")  # modules the routing index holds by default (the default probe)

DeviceFactors = dict[str, tuple[torch.Tensor, torch.Tensor]]  # module path -> (A, cB) on the device


@dataclass(frozen=True)
class AdapterEntry:
    """What the pool keeps of every adapter whatever is resident: where it is and its shape."""

    name: str
    path: Path
    ranks: dict[str, int]  # module path -> rank, for the modules it adapts
    nbytes: int  # bytes of its full factors in the pool's dtype


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
    """A validated pool of LoRA adapters for one base model: routing index plus resident factors."""

    def __init__(self, adapters: Iterable[Adapter], model: nn.Module, dtype: torch.dtype, device: torch.device,
                 index_modules: tuple[str, ...] = INDEX_MODULES, index_with_B: bool = False,
                 max_resident: int | str | ResidencyBound | None = None,
                 reread: Callable[[AdapterEntry], Adapter] | None = None):
        """`adapters`: in name order when an iterator (a list is sorted here). `reread`: reads an
        adapter again for a later load; None keeps the given adapters' host copies for that."""
        if isinstance(adapters, (list, tuple)):
            adapters = sorted(adapters, key=lambda a: a.name)
        self.dtype, self.device = dtype, torch.device(device)
        self.bound = max_resident if isinstance(max_resident, ResidencyBound) else parse_max_resident(max_resident)
        self.routing_index = RoutingIndex(tuple(index_modules), index_with_B, self.device)
        self.entries: list[AdapterEntry] = []
        self._host: dict[str, Adapter] = {}
        self._reread = reread
        self.residency: Residency[int, DeviceFactors] = Residency(self.bound, self._load,
                                                                  lambda i: self.entries[i].nbytes)
        first: list[DeviceFactors] = []
        itemsize = torch.tensor([], dtype=dtype).element_size()
        for adapter in adapters:
            validate_adapter(adapter, model)
            _check_range(adapter, dtype)
            if self.entries and adapter.name <= self.entries[-1].name:
                raise AdapterError(f"adapters must come in name order; {adapter.name!r} follows "
                                   f"{self.entries[-1].name!r}")
            self.routing_index.add(adapter)
            self.entries.append(AdapterEntry(
                name=adapter.name, path=adapter.path,
                ranks={m: f.rank for m, f in adapter.factors.items()},
                nbytes=sum(f.A.numel() + f.B.numel() for f in adapter.factors.values()) * itemsize))
            if reread is None:
                self._host[adapter.name] = adapter
            if self.bound.unbounded:
                first.append(self._device_factors(adapter))
        if not self.entries:
            raise AdapterError("the adapter pool is empty; LoGo needs at least one adapter")
        self.routing_index.finish()
        self.names: tuple[str, ...] = tuple(e.name for e in self.entries)
        self.paths: tuple[Path, ...] = tuple(e.path for e in self.entries)
        self._index = {name: i for i, name in enumerate(self.names)}
        self.modules: tuple[str, ...] = tuple(sorted({m for e in self.entries for m in e.ranks}))
        self._sizes = [e.nbytes for e in self.entries]
        if first:  # every adapter resident from the start: nothing is ever read again
            for i, factors in enumerate(first):
                self.residency.held[i] = factors
                self.residency.nbytes += self.entries[i].nbytes
            self.residency.counts.peak_adapters = len(first)
            self.residency.counts.peak_bytes = self.residency.nbytes

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
        max_resident: int | str | ResidencyBound | None = None,
        pins: Mapping[str, str] | None = None,
    ) -> "AdapterPool":
        """Read, validate and index a pool (a directory of adapter directories, or name -> path),
        one adapter at a time.

        `index_modules`: module names (last path component) whose float32 probe factors the routing
        index keeps, at every block; `index_with_B`: keep B too (the entropy signal needs it);
        `max_resident`: at most this many adapters (or bytes, e.g. '20GiB') of full factors on the
        device, None for all of them (see `actors.residency`); `pins`: `<name>/<file>` -> fingerprint
        (a job's `_job.json`), checked at every read of an adapter, at start-up and after an eviction,
        so that a file replaced mid-run stops the run instead of mixing two versions."""
        sources = resolve_sources(adapters)

        def read(name: str, path: Path) -> Adapter:
            files = {f"{name}/{file}": Path(path) / file for file in (CONFIG_FILE, WEIGHTS_FILE)}
            return read_pinned(files, pins, lambda: read_adapter(name, path, model), f"adapter {name!r}")

        reading = (read(name, path) for name, path in sorted(sources.items()))
        return cls(reading, model, dtype, torch.device(device), index_modules, index_with_B, max_resident,
                   reread=lambda entry: read(entry.name, entry.path))

    def __len__(self) -> int:
        return len(self.names)

    def index(self, name: str) -> int:
        return self._index[name]

    def _device_factors(self, adapter: Adapter) -> DeviceFactors:
        return {m: (f.A.to(device=self.device, dtype=self.dtype).contiguous(),
                    (f.B * f.scale).to(device=self.device, dtype=self.dtype).contiguous())
                for m, f in sorted(adapter.factors.items())}

    def _load(self, i: int) -> DeviceFactors:
        entry = self.entries[i]
        adapter = self._host[entry.name] if self._reread is None else self._reread(entry)
        if {m: f.rank for m, f in adapter.factors.items()} != entry.ranks:
            raise AdapterError(f"adapter {entry.name!r} at {entry.path} changed since the pool was read (its modules "
                               "or ranks differ); keep adapter files unchanged while a job runs")
        return self._device_factors(adapter)

    def acquire(self, indices: Iterable[int]) -> dict[int, DeviceFactors]:
        """The device factors of these adapters, all resident together (loading the others)."""
        return self.residency.acquire(sorted(set(indices)))

    def sizes(self) -> list[int]:
        """Bytes of every adapter's full factors in the pool's dtype, by index (read on every
        generate call: kept, not rebuilt)."""
        return self._sizes

    @property
    def nbytes(self) -> int:
        """Device memory held by resident factors now."""
        return self.residency.nbytes

    @property
    def full_nbytes(self) -> int:
        """Device memory the whole pool's factors would take (every adapter resident)."""
        return sum(e.nbytes for e in self.entries)

    def describe(self) -> str:
        ranks = sorted({r for e in self.entries for r in e.ranks.values()})
        return (f"{len(self)} adapters over {len(self.modules)} modules, ranks {ranks}; full factors "
                f"{self.full_nbytes / 2**20:.1f} MiB on {self.device} ({self.dtype}), resident: "
                f"{self.bound.describe()}; routing index {self.routing_index.nbytes / 2**20:.1f} MiB "
                f"(float32, {', '.join(self.routing_index.modules)})")
