"""Bounded residency: which adapters' full factors live in which slot of the device storage, LRU-evicted.

Routing reads the routing index (every adapter's probe factors), so only the mixture needs full
factors, and only for the adapters a generate call selected. The pool stores resident adapters in a
fixed number of slots (`actors.pool`); `Residency` is the slot table: which adapter holds which
slot, loading the others one at a time from their files into a free (or freed) slot when a call
needs them, and evicting those used least recently. The slot a row uses is data: which adapters are
resident, and where, never changes an output (a slot holds exactly what a fresh load would give).

No torch import at module level: the job configuration validates `max_resident` with
`parse_max_resident` without loading torch.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Generic, Hashable, Mapping, TypeVar

UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b|b)\s*$", re.IGNORECASE)


def format_bytes(n: float) -> str:
    """Bytes in the largest binary unit that keeps the number at least 1: `512 B`, `1.0 KiB`,
    `3.2 MiB`, `20.0 GiB`."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


@dataclass(frozen=True)
class ResidencyBound:
    """At most `adapters` adapters and at most `nbytes` bytes of factors (None: no such bound);
    `auto`: as many bytes as the device has free once the model is loaded, less a headroom (the
    pool resolves it: `actors.pool`; on the CPU, the whole pool)."""

    adapters: int | None = None
    nbytes: int | None = None
    auto: bool = False

    @property
    def unbounded(self) -> bool:
        return self.adapters is None and self.nbytes is None and not self.auto

    def admits(self, count: int, nbytes: int) -> bool:
        return (self.adapters is None or count <= self.adapters) and (self.nbytes is None or nbytes <= self.nbytes)

    def describe(self) -> str:
        if self.unbounded:
            return "all"
        if self.auto:
            return "auto"
        if self.adapters is not None:
            return f"{self.adapters} adapters"
        return format_bytes(self.nbytes)


def parse_max_resident(value: int | str | None) -> ResidencyBound:
    """`max_resident` -> its bound: None (every adapter resident), a number of adapters (int >= 1,
    or its decimal string), a size with a unit (`512MiB`, `20GB`, `1.5GiB`), or `auto` (what the
    device has free, less `memory_headroom`)."""
    if value is None:
        return ResidencyBound()
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"max_resident={value!r}: give a number of adapters (e.g. 32), a size (e.g. '20GiB'), "
                         "auto, or null for the whole pool")
    if isinstance(value, str) and value.strip().lower() == "auto":
        return ResidencyBound(auto=True)
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, int):
        if value < 1:
            raise ValueError(f"max_resident={value}: must be >= 1 adapter (or null for the whole pool)")
        return ResidencyBound(adapters=value)
    match = _SIZE.match(value)
    if not match:
        raise ValueError(f"max_resident={value!r}: not a number of adapters nor a size; write e.g. 32, '512MiB', "
                         "'20GB' or auto")
    nbytes = int(float(match.group(1)) * UNITS[match.group(2).lower()])
    if nbytes < 1:
        raise ValueError(f"max_resident={value!r}: a size must be positive")
    return ResidencyBound(nbytes=nbytes)


def slot_rank(rank: int, itemsize: int) -> int:
    """A slot's rank: `rank` rounded up so that a row of it fills whole 16-byte units (grouped_mm
    needs its operands' strides in multiples of 16 bytes)."""
    unit = max(1, 16 // itemsize)
    return -(-rank // unit) * unit


def slot_nbytes(modules: Mapping[str, tuple[int, int, int]], itemsize: int) -> int:
    """Bytes of one adapter slot: every adapted module (path -> (largest rank in the pool, d_in,
    d_out)) at its slot rank, A and cB."""
    return sum(slot_rank(r, itemsize) * (d_in + d_out) for r, d_in, d_out in modules.values()) * itemsize


def check_bound(bound: ResidencyBound, k: int, slot: int, adapters: int, budget: int | None = None) -> None:
    """Refuse a bound whose slots cannot hold one row's `k` adapters at once (`k` at most the pool's
    `adapters`; `slot`: bytes of one slot, `slot_nbytes`; `budget`: the bytes the slots may take,
    default the bound's own). The one check of it: the actor makes it on its pool, and the job's
    driver on the shapes in the adapters' file headers, before any work."""
    k = min(k, adapters)
    if bound.adapters is not None and bound.adapters < k:
        raise ValueError(f"max_resident={bound.adapters} adapters cannot hold one prompt's k={k} selected adapters "
                         f"at once; set max_resident >= {k} (or null for the whole pool)")
    budget = bound.nbytes if budget is None else budget
    if budget is not None and budget // slot < k:
        raise ValueError(f"max_resident={bound.describe()} holds {budget // slot} adapter slots of "
                         f"{format_bytes(slot)} (every adapted module at the pool's largest rank there), fewer than "
                         f"one prompt's k={k} adapters; raise it to at least {format_bytes(k * slot)} (or null for "
                         "the whole pool)")


K = TypeVar("K", bound=Hashable)


@dataclass
class ResidencyCounts:
    """Running totals of one residency: adapter loads, hits, evictions and the peak held."""

    loads: int = 0
    hits: int = 0
    evictions: int = 0
    peak_adapters: int = 0
    peak_bytes: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"loads": self.loads, "hits": self.hits, "evictions": self.evictions,
                "peak_adapters": self.peak_adapters, "peak_bytes": self.peak_bytes}


class Residency(Generic[K]):
    """An LRU slot table of `slots` slots under a `ResidencyBound`: `load(key, slot)` writes a key's
    value into a slot, `size(key)` says its bytes (known before loading, so room is made first and
    the bound holds at every moment). `acquire(keys)` makes every key resident at once (a generate
    call needs its whole union) and says each key's slot, evicting least recently used keys outside
    `keys`."""

    def __init__(self, bound: ResidencyBound, slots: int, load: Callable[[K, int], None], size: Callable[[K], int]):
        self.bound, self._load, self._size = bound, load, size
        self.held: OrderedDict[K, int] = OrderedDict()  # key -> slot, least recently used first
        self.free = list(range(slots - 1, -1, -1))  # free slots, the lowest last (popped first)
        self.nbytes = 0
        self.counts = ResidencyCounts()

    def place(self, key: K, slot: int) -> None:
        """Record `key` as already in `slot` (a value written there without `load`)."""
        self.free.remove(slot)
        self.held[key] = slot
        self.nbytes += self._size(key)
        self.counts.peak_adapters = max(self.counts.peak_adapters, len(self.held))
        self.counts.peak_bytes = max(self.counts.peak_bytes, self.nbytes)

    def acquire(self, keys: list[K]) -> dict[K, int]:
        """Slots of `keys`, all resident on return. The caller keeps the union of one call within
        the bound and the slots (see `split_by_bound`); a single adapter larger than a bytes bound
        still loads."""
        wanted = set(keys)
        out: dict[K, int] = {}
        for key in keys:
            if key in self.held:
                self.held.move_to_end(key)
                self.counts.hits += 1
                out[key] = self.held[key]
        for key in keys:
            if key in out:
                continue
            size = self._size(key)
            while self.held and (not self.free or not self.bound.admits(len(self.held) + 1, self.nbytes + size)):
                victim = next((k for k in self.held if k not in wanted), None)
                if victim is None:
                    break
                self.free.append(self.held.pop(victim))
                self.nbytes -= self._size(victim)
                self.counts.evictions += 1
            if not self.free:
                raise RuntimeError(f"no free slot for {key!r}: one call's union exceeds the {len(self.held)} slots")
            slot = self.free.pop()
            try:
                self._load(key, slot)  # after the evictions: never one adapter over the bound
            except BaseException:
                self.free.append(slot)
                raise
            self.held[key] = slot
            self.nbytes += size
            self.counts.loads += 1
            out[key] = slot
        self.counts.peak_adapters = max(self.counts.peak_adapters, len(self.held))
        self.counts.peak_bytes = max(self.counts.peak_bytes, self.nbytes)
        return out


def split_by_bound(selections: list[tuple[int, ...]], sizes: list[int], bound: ResidencyBound) -> list[list[int]]:
    """Rows (each a selection of adapter indices) cut into parts whose union of adapters fits `bound`
    (`sizes[i]`: adapter i's bytes). Rows with equal selections stay together; parts are filled in
    order of selection so rows sharing adapters share a part. One part when the union fits."""
    union = sorted({i for s in selections for i in s})
    if bound.unbounded or bound.admits(len(union), sum(sizes[i] for i in union)):
        return [list(range(len(selections)))]
    order = sorted(range(len(selections)), key=lambda r: (sorted(selections[r]), r))
    parts: list[list[int]] = []
    current: list[int] = []
    held: set[int] = set()
    for row in order:
        grown = held | set(selections[row])
        if current and not bound.admits(len(grown), sum(sizes[i] for i in grown)):
            parts.append(current)
            current, grown = [], set(selections[row])
        current.append(row)
        held = grown
    parts.append(current)
    return [sorted(p) for p in parts]

