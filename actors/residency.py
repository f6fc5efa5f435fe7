"""Bounded residency: which adapters' full factors live on the device, loaded on demand, LRU-evicted.

Routing reads the routing index (every adapter's probe factors), so only the mixture needs full
factors, and only for the adapters a generate call selected. `Residency` keeps at most a bounded
number (or bytes) of adapters on the device, loads the others one at a time from their files when a
call needs them, and evicts those used least recently. Which adapters are resident never changes
an output: a resident adapter's factors are exactly what a fresh load would give.

No torch import at module level: the job configuration validates `max_resident` with
`parse_max_resident` without loading torch.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Generic, Hashable, TypeVar

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
    """At most `adapters` adapters and at most `nbytes` bytes of factors (None: no such bound)."""

    adapters: int | None = None
    nbytes: int | None = None

    @property
    def unbounded(self) -> bool:
        return self.adapters is None and self.nbytes is None

    def admits(self, count: int, nbytes: int) -> bool:
        return (self.adapters is None or count <= self.adapters) and (self.nbytes is None or nbytes <= self.nbytes)

    def describe(self) -> str:
        if self.unbounded:
            return "all"
        if self.adapters is not None:
            return f"{self.adapters} adapters"
        return format_bytes(self.nbytes)


def parse_max_resident(value: int | str | None) -> ResidencyBound:
    """`max_resident` -> its bound: None (every adapter resident), a number of adapters (int >= 1,
    or its decimal string), or a size with a unit (`512MiB`, `20GB`, `1.5GiB`)."""
    if value is None:
        return ResidencyBound()
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"max_resident={value!r}: give a number of adapters (e.g. 32), a size (e.g. '20GiB') "
                         "or null for the whole pool")
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, int):
        if value < 1:
            raise ValueError(f"max_resident={value}: must be >= 1 adapter (or null for the whole pool)")
        return ResidencyBound(adapters=value)
    match = _SIZE.match(value)
    if not match:
        raise ValueError(f"max_resident={value!r}: not a number of adapters nor a size; write e.g. 32, '512MiB' "
                         "or '20GB'")
    nbytes = int(float(match.group(1)) * UNITS[match.group(2).lower()])
    if nbytes < 1:
        raise ValueError(f"max_resident={value!r}: a size must be positive")
    return ResidencyBound(nbytes=nbytes)


def check_bound(bound: ResidencyBound, k: int, sizes: list[int]) -> None:
    """Refuse a bound that cannot hold one row's `k` adapters at once (`k` at most the pool's size;
    `sizes`: every adapter's bytes of full factors). The one check of it: the actor makes it on its
    pool, and the job's driver on the sizes in the adapters' file headers, before any work."""
    k = min(k, len(sizes))
    if bound.adapters is not None and bound.adapters < k:
        raise ValueError(f"max_resident={bound.adapters} adapters cannot hold one prompt's k={k} selected adapters "
                         f"at once; set max_resident >= {k} (or null for the whole pool)")
    largest = sum(sorted(sizes)[-k:]) if k else 0
    if bound.nbytes is not None and bound.nbytes < largest:
        raise ValueError(f"max_resident={bound.describe()} cannot hold the k={k} largest adapters at once "
                         f"({format_bytes(largest)}); raise it to at least that (or null for the whole pool)")


K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


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


class Residency(Generic[K, V]):
    """An LRU set of loaded values under a `ResidencyBound`; `load(key)` makes a value, `size(key)`
    says its bytes (known before loading, so room is made first and the bound holds at every
    moment). `acquire(keys)` makes every key resident at once (a generate call needs its whole
    union), evicting least recently used keys outside `keys`."""

    def __init__(self, bound: ResidencyBound, load: Callable[[K], V], size: Callable[[K], int]):
        self.bound, self._load, self._size = bound, load, size
        self.held: OrderedDict[K, V] = OrderedDict()
        self.nbytes = 0
        self.counts = ResidencyCounts()

    def acquire(self, keys: list[K]) -> dict[K, V]:
        """Values of `keys`, all resident on return. The caller keeps the union of one call within
        the bound (see `split_by_bound`); a single adapter larger than a bytes bound still loads."""
        wanted = set(keys)
        out: dict[K, V] = {}
        for key in keys:
            if key in self.held:
                self.held.move_to_end(key)
                self.counts.hits += 1
                out[key] = self.held[key]
        for key in keys:
            if key in out:
                continue
            size = self._size(key)
            while self.held and not self.bound.admits(len(self.held) + 1, self.nbytes + size):
                victim = next((k for k in self.held if k not in wanted), None)
                if victim is None:
                    break
                del self.held[victim]
                self.nbytes -= self._size(victim)
                self.counts.evictions += 1
            value = self._load(key)  # after the evictions: never one adapter over the bound
            self.held[key] = value
            self.nbytes += size
            self.counts.loads += 1
            out[key] = value
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

