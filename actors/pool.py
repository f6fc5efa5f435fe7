"""The adapter pool: every adapter's identity and routing factors, and a bounded set of resident factors.

Adapters are read one at a time, in name order (index order is name order, which is what makes
routing ties deterministic): each is validated against the base model, its probe factors go into
the routing index (float32, small: see `actors.index`, sized from the files' headers and filled in
place), and its full factors are dropped unless the residency keeps them. With a bounded residency
`load` reads only the index modules' tensors at start-up (the other modules' shapes from the
header); the full factors are read, and checked, when an adapter becomes resident. The full
factors of resident adapters live in slots of stacked storage, per
adapted module

    A     (S, r_m, d_in)     slot s holds adapter A rows 0..r-1, zeros after them
    cB^T  (S, r_m, d_out)    B with the adapter's scale folded in, transposed, zero rows after r

in the pool's dtype, with S slots (the whole pool, or what `max_resident` allows) and r_m the
largest rank any adapter has at module m, rounded up to 16 bytes a row (`actors.residency.slot_rank`;
an adapter lacking the module holds zeros there). The
mixture reads the slots in place (`actors.mixture`); `acquire_slots` makes a generate call's union
resident and says where, loading the others from their files least recently used first out (see
`actors.residency`). A slot holds exactly what a fresh read gives, so which adapters happen to be
resident, and where, never changes an output.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch
from torch import nn

from actors.adapters import (CONFIG_FILE, WEIGHTS_FILE, Adapter, AdapterError, header_shapes, read_adapter,
                             resolve_sources, validate_adapter)
from actors.budget import MEMORY_HEADROOM, DeviceBudget, device_budget, slots_within
from actors.fingerprint import read_pinned
from actors.index import INDEX_FORMAT, RoutingIndex
from actors.residency import (Residency, ResidencyBound, format_bytes, parse_max_resident, slot_nbytes,
                              slot_rank)

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


def _indexed(device: torch.device) -> torch.device:
    """`cuda` as the device it means now (`cuda:0`, ...), as tensors' `.device` name it."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def pool_digest(sources: Mapping[str, Path], pins: Mapping[str, str] | None, index_modules: tuple[str, ...],
                with_B: bool) -> str:
    """The version of a pool's routing index: sha256 over every adapter file's pin (or its size,
    mtime and inode without one) and the index's modules and signal."""
    h = hashlib.sha256(json.dumps([INDEX_FORMAT, list(index_modules), with_B]).encode())
    for name, path in sorted(sources.items()):
        for file in (CONFIG_FILE, WEIGHTS_FILE):
            key = f"{name}/{file}"
            if pins is not None and key in pins:
                stamp = pins[key]
            else:
                try:
                    st = (Path(path) / file).stat()
                    stamp = f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"
                except OSError:
                    stamp = "missing"
            h.update(f"{key}={stamp}\n".encode())
    return h.hexdigest()


def _fits(model: nn.Module, shapes: Mapping[str, tuple[int, int, int]]) -> bool:
    """Every declared (rank, d_in, d_out) is that of a Linear of `model`, the rank at most its sides."""
    for m, (r, d_in, d_out) in shapes.items():
        try:
            layer = model.get_submodule(m)
        except AttributeError:
            return False
        layer = getattr(layer, "base_layer", layer)
        sides = (getattr(layer, "in_features", None), getattr(layer, "out_features", None))
        if sides != (d_in, d_out) or not 0 < r <= min(d_in, d_out):
            return False
    return True


def _largest(shapes: list[Mapping[str, tuple[int, int, int]]]) -> dict[str, tuple[int, int, int]]:
    """Module path -> (largest rank, d_in, d_out) over adapters' module shapes."""
    out: dict[str, tuple[int, int, int]] = {}
    for each in shapes:
        for m, (r, d_in, d_out) in each.items():
            out[m] = (max(r, out[m][0]), d_in, d_out) if m in out else (r, d_in, d_out)
    return out


def _bound(max_resident: int | str | ResidencyBound | None, model: nn.Module, memory_headroom: float) -> ResidencyBound:
    """The residency bound asked for, as the pool applies it: auto without a device budget (the
    CPU) is the whole pool."""
    if not 0 <= memory_headroom < 1:
        raise ValueError(f"memory_headroom={memory_headroom!r}: give the share of device memory left free for "
                         "activations and the allocator, >= 0 and < 1 (e.g. 0.1)")
    bound = max_resident if isinstance(max_resident, ResidencyBound) else parse_max_resident(max_resident)
    if bound.auto and any(device_budget(d, memory_headroom) is None for d in {p.device for p in model.parameters()}):
        return ResidencyBound()
    return bound


class AdapterPool:
    """A validated pool of LoRA adapters for one base model: routing index plus resident factors."""

    def __init__(self, adapters: Iterable[Adapter], model: nn.Module, dtype: torch.dtype, device: torch.device,
                 index_modules: tuple[str, ...] = INDEX_MODULES, index_with_B: bool = False,
                 max_resident: int | str | ResidencyBound | None = None,
                 reread: Callable[[AdapterEntry], Adapter] | None = None, memory_headroom: float = MEMORY_HEADROOM,
                 kv_cache: Mapping[torch.device, int] | None = None,
                 index_shapes: tuple[int, Mapping[str, tuple[int, int, int]]] | None = None,
                 routing_index: RoutingIndex | None = None):
        """`adapters`: in name order when an iterator (a list is sorted here). `index_shapes`: the
        number of adapters and module path -> (largest rank, d_in, d_out) over them (from the files'
        headers), so that the routing index is filled in place (a list gives them itself);
        `routing_index`: one already built for these adapters (a shared index file), used as is. `reread`: reads an
        adapter again for a later load; None keeps the given adapters' host copies for that.
        `memory_headroom`: with max_resident auto, the share of each device's memory left free;
        `kv_cache`: bytes to keep free on each device for the KV cache of a full batch (auto only).
        Each module's slots live on the device of the model's module (several with a device map);
        the routing index on `device`."""
        if isinstance(adapters, (list, tuple)):
            adapters = sorted(adapters, key=lambda a: a.name)
        self.dtype, self.device = dtype, torch.device(device)
        self.bound = _bound(max_resident, model, memory_headroom)
        self.memory_headroom = memory_headroom
        self.kv_cache = {_indexed(torch.device(d)): n for d, n in (kv_cache or {}).items()}
        if index_shapes is None and isinstance(adapters, list):
            index_shapes = (len(adapters), _largest([a.module_shapes() for a in adapters]))
        n, shapes = index_shapes or (None, None)
        prebuilt = routing_index is not None
        self.routing_index = routing_index or RoutingIndex(tuple(index_modules), index_with_B, self.device, n, shapes)
        self.entries: list[AdapterEntry] = []
        self._host: dict[str, Adapter] = {}
        self._reread = reread
        first: list[DeviceFactors] = []
        self.module_device: dict[str, torch.device] = {}  # module path -> where its slots live
        self.budgets: dict[torch.device, DeviceBudget] = {}  # with auto on a GPU: each device's, at start-up
        dims: dict[str, tuple[int, int]] = {}  # module path -> (d_in, d_out)
        itemsize = self.itemsize = torch.tensor([], dtype=dtype).element_size()
        for adapter in adapters:
            if adapter.shapes is not None and (self.bound.unbounded or reread is None):
                raise ValueError(f"adapter {adapter.name!r} was read without all its factors; a pool holding every "
                                 "adapter resident, or with no reread, needs them all (read it with only=None)")
            validate_adapter(adapter, model)
            _check_range(adapter, dtype)
            if self.entries and adapter.name <= self.entries[-1].name:
                raise AdapterError(f"adapters must come in name order; {adapter.name!r} follows "
                                   f"{self.entries[-1].name!r}")
            if not prebuilt:
                self.routing_index.add(adapter)
            shapes = adapter.module_shapes()
            self.entries.append(AdapterEntry(
                name=adapter.name, path=adapter.path, ranks={m: r for m, (r, _, _) in shapes.items()},
                nbytes=sum(r * (d_in + d_out) for r, d_in, d_out in shapes.values()) * itemsize))
            dims.update({m: (d_in, d_out) for m, (_, d_in, d_out) in shapes.items()})
            for m in shapes:
                if m not in self.module_device:
                    self.module_device[m] = model.get_submodule(m).weight.device
            if reread is None:
                self._host[adapter.name] = adapter
            if self.bound.unbounded:
                first.append(self._device_factors(adapter))
        if not self.entries:
            raise AdapterError("the adapter pool is empty; LoGo needs at least one adapter")
        if not prebuilt:
            self.routing_index.finish()
        self.names: tuple[str, ...] = tuple(e.name for e in self.entries)
        self.paths: tuple[Path, ...] = tuple(e.path for e in self.entries)
        self._index = {name: i for i, name in enumerate(self.names)}
        self.modules: tuple[str, ...] = tuple(sorted({m for e in self.entries for m in e.ranks}))
        self._sizes = [e.nbytes for e in self.entries]
        self.slot_ranks = {m: slot_rank(max(e.ranks.get(m, 0) for e in self.entries), itemsize) for m in self.modules}
        self.dims = {m: dims[m] for m in self.modules}
        shapes = {m: (max(e.ranks.get(m, 0) for e in self.entries), *self.dims[m]) for m in self.modules}
        self.slot_nbytes = slot_nbytes(shapes, itemsize)
        self.devices = tuple(dict.fromkeys(self.module_device[m] for m in self.modules))
        self.slot_bytes = {d: slot_nbytes({m: v for m, v in shapes.items() if self.module_device[m] == d}, itemsize)
                           for d in self.devices}  # device -> its share of one slot
        if self.bound.auto:  # measured now: the model and the routing index loaded, the slots not yet
            self.budgets = {d: device_budget(d, memory_headroom, self.kv_cache.get(d, 0)) for d in self.devices}
        self.slots = self._slot_count()
        self.capacity = self.bound if self.bound.unbounded else ResidencyBound(self.slots, self.bound.nbytes)
        """The bound a generate call's union must fit: the bound given, and the slots it allows."""
        self.residency: Residency[int] = Residency(self.capacity, self.slots, self._load,
                                                   lambda i: self.entries[i].nbytes)
        self.A: dict[str, torch.Tensor] = {}  # module path -> (S, r_m, d_in)
        self.B: dict[str, torch.Tensor] = {}  # module path -> (S, r_m, d_out): cB transposed
        for m, r in self.slot_ranks.items():  # one module at a time: its per-adapter copies go as it fills
            d_in, d_out = self.dims[m]
            where = self.module_device[m]
            self.A[m] = torch.zeros(self.slots, r, d_in, dtype=dtype, device=where)
            self.B[m] = torch.zeros(self.slots, r, d_out, dtype=dtype, device=where)
            for i, factors in enumerate(first):
                if m in factors:
                    self._write(i, m, *factors.pop(m))
        for i in range(len(first)):  # every adapter resident from the start: nothing is ever read again
            self.residency.place(i, i)

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
        memory_headroom: float = MEMORY_HEADROOM,
        kv_cache: Mapping[torch.device, int] | None = None,
        index_cache: str | Path | None = None,
    ) -> "AdapterPool":
        """Read, validate and index a pool (a directory of adapter directories, or name -> path),
        one adapter at a time.

        `index_modules`: module names (last path component) whose float32 probe factors the routing
        index keeps, at every block; `index_with_B`: keep B too (the entropy signal needs it);
        `max_resident`: at most this many adapters (or bytes, e.g. '20GiB') of full factors on the
        device, `auto` for what the device has free less `memory_headroom` of it (the whole pool on
        the CPU) and `kv_cache` (bytes per device) kept free, None for all of them (see
        `actors.residency`); `pins`: `<name>/<file>` ->
        fingerprint (a job's `_job.json`), checked at every read of an adapter, at start-up and after
        an eviction, so that a file replaced mid-run stops the run instead of mixing two versions.
        `index_cache`: a folder (the node's cache) where the routing index is kept as one safetensors
        file per pool version (`routing-index/<digest>.safetensors`, the digest of the pins, or of
        the files' size, mtime and inode without pins, and the index's modules): the first load
        builds and writes it, later loads memory-map it and read no adapter tensor for it."""
        sources = resolve_sources(adapters)
        names = tuple(sorted(sources))
        shared = None
        if index_cache is not None:
            digest = pool_digest(sources, pins, index_modules, index_with_B)
            shared = Path(index_cache) / "routing-index" / f"{digest}.safetensors"
        prebuilt = None if shared is None else RoutingIndex.open(shared, tuple(index_modules), index_with_B,
                                                                 torch.device(device), names)
        # with a bounded residency only the routing index's tensors are read now (none with a shared
        # index); an adapter's full factors when it becomes resident (`_load`)
        bounded = not _bound(max_resident, model, memory_headroom).unbounded
        only = None if not bounded else () if prebuilt is not None else tuple(index_modules)

        def read(name: str, path: Path, only: tuple[str, ...] | None = None) -> Adapter:
            files = {f"{name}/{file}": Path(path) / file for file in (CONFIG_FILE, WEIGHTS_FILE)}
            return read_pinned(files, pins, lambda: read_adapter(name, path, model, only), f"adapter {name!r}")

        reading = (read(name, path, only) for name, path in sorted(sources.items()))
        index_shapes = None
        if prebuilt is None:
            headers = [header_shapes(path) for path in sources.values()]  # a few KiB each: sizes the index
            fits = None not in headers and all(_fits(model, h) for h in headers)
            # a header the model refutes sizes nothing: reading that adapter names what is wrong first
            index_shapes = (len(headers), _largest(headers)) if fits else None
        pool = cls(reading, model, dtype, torch.device(device), index_modules, index_with_B, max_resident,
                   reread=lambda entry: read(entry.name, entry.path), memory_headroom=memory_headroom,
                   kv_cache=kv_cache, index_shapes=index_shapes, routing_index=prebuilt)
        if shared is not None and prebuilt is None:
            try:
                pool.routing_index.save(shared, pool.names)
            except OSError:  # a read-only cache: each load builds its own
                pass
        return pool

    def __len__(self) -> int:
        return len(self.names)

    def index(self, name: str) -> int:
        return self._index[name]

    def _slot_count(self) -> int:
        """Slots of the storage: the whole pool, at most `max_resident` adapters, or as many slots
        as its bytes hold (0 when none fits: the engine refuses such a bound)."""
        if self.bound.unbounded:
            return len(self.entries)
        if self.bound.adapters is not None:
            return min(len(self.entries), self.bound.adapters)
        if self.bound.auto:
            return min(len(self.entries), slots_within(self.budgets, self.slot_bytes))
        return min(len(self.entries), self.bound.nbytes // self.slot_nbytes)

    def budget_lines(self) -> list[str]:
        """With auto on a GPU, the budget's arithmetic, one line per device and the slots it gives."""
        if not self.budgets:
            return []
        return [*(b.describe() for b in self.budgets.values()),
                f"= {self.slots} adapter slots of {format_bytes(self.slot_nbytes)} "
                f"({format_bytes(self.storage_nbytes)}) for {len(self)} adapters"]

    def _write(self, slot: int, module: str, A: torch.Tensor, cB: torch.Tensor) -> None:
        """Slot `slot` of `module` := (A, cB), zero-padded to the slot's rank."""
        r = A.shape[0]
        self.A[module][slot, :r].copy_(A)
        self.A[module][slot, r:].zero_()
        self.B[module][slot, :r].copy_(cB.T)
        self.B[module][slot, r:].zero_()

    def _device_factors(self, adapter: Adapter) -> DeviceFactors:
        return {m: (self._to_device(f.A, m), self._to_device(f.B * f.scale, m))
                for m, f in sorted(adapter.factors.items())}

    def _to_device(self, t: torch.Tensor, module: str) -> torch.Tensor:
        """A host tensor on `module`'s device in the pool's dtype; to CUDA through pinned memory
        without blocking the host (the copy into a slot is queued behind it on the same stream)."""
        t = t.to(dtype=self.dtype).contiguous()
        where = self.module_device[module]
        if where.type == "cuda":
            return t.pin_memory().to(where, non_blocking=True)
        return t.to(where)

    def _load(self, i: int, slot: int) -> None:
        entry = self.entries[i]
        adapter = self._host[entry.name] if self._reread is None else self._reread(entry)
        if {m: f.rank for m, f in adapter.factors.items()} != entry.ranks:
            raise AdapterError(f"adapter {entry.name!r} at {entry.path} changed since the pool was read (its modules "
                               "or ranks differ); keep adapter files unchanged while a job runs")
        _check_range(adapter, self.dtype)  # its modules outside the index are first read now
        factors = self._device_factors(adapter)
        for m in self.modules:
            if m in factors:
                self._write(slot, m, *factors[m])
            else:
                self.A[m][slot].zero_()
                self.B[m][slot].zero_()

    def acquire_slots(self, indices: Iterable[int]) -> dict[int, int]:
        """The slot of each of these adapters, all resident together (loading the others)."""
        return self.residency.acquire(sorted(set(indices)))

    def acquire(self, indices: Iterable[int]) -> dict[int, DeviceFactors]:
        """The device factors of these adapters (views of their slots, each at its own rank), all
        resident together."""
        slots = self.acquire_slots(indices)
        return {i: {m: (self.A[m][s, :r], self.B[m][s, :r].T) for m, r in sorted(self.entries[i].ranks.items())}
                for i, s in slots.items()}

    def sizes(self) -> list[int]:
        """Bytes of every adapter's full factors in the pool's dtype, by index (read on every
        generate call: kept, not rebuilt)."""
        return self._sizes

    @property
    def nbytes(self) -> int:
        """Bytes of the resident adapters' factors now (each at its own rank)."""
        return self.residency.nbytes

    @property
    def storage_nbytes(self) -> int:
        """Device memory of the slot storage (every slot at its module's largest rank)."""
        return self.slots * self.slot_nbytes

    @property
    def full_nbytes(self) -> int:
        """Device memory the whole pool's factors would take (every adapter resident)."""
        return sum(e.nbytes for e in self.entries)

    def describe(self) -> str:
        ranks = sorted({r for e in self.entries for r in e.ranks.values()})
        return (f"{len(self)} adapters over {len(self.modules)} modules, ranks {ranks}; full factors "
                f"{self.full_nbytes / 2**20:.1f} MiB on {self.device} ({self.dtype}), resident: "
                f"{self.bound.describe()} ({self.slots} slots, {self.storage_nbytes / 2**20:.1f} MiB); routing index {self.routing_index.nbytes / 2**20:.1f} MiB "
                f"(float32, {', '.join(self.routing_index.modules)})")
