"""The routing index: what routing reads of every adapter, in float32, apart from the mixture's storage.

Routing scores every adapter of the pool at every probed (block, module) pair, so it needs every
adapter's probe factors, but not the factors the mixture multiplies by. With the norm signal it
needs even less than the probe factors themselves:

    ||c B A h||^2 = z^T (c^2 B^T B) z,   z = A h            (r-dimensional, r = the adapter's rank)

so per pair and adapter the index holds `A` (r x d_in) and the r x r Gram matrix `G = c^2 B^T B`,
both in float32 computed from the float32 factors read from the safetensors file (never from the
pool's bfloat16 copy: rounding the factors first changes close top-k choices). The entropy signal
needs the whole output `c B A h`, so an index built for it also holds `c B` in float32.

Memory per adapter and pair: 4 * r * (d_in + r) bytes (plus 4 * r * d_out with B): for rank 16 at
q_proj and v_proj of the 32 blocks of a 4096-wide 8B model, 16.8 MiB per adapter, a fifth of the
adapter's full bfloat16 factors on all seven modules (84 MB).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from actors.adapters import Adapter, AdapterError

INDEX_FORMAT = "logo-routing-index-1"  # written in a shared index file's metadata
SCORE_CHUNK = 1024  # adapters scored at once: bounds the (rows, chunk, d_out) tensor of the entropy signal


@dataclass(frozen=True)
class ProbeFactors:
    """Every adapter's factors at one module path, zero-padded to one rank (r_max)."""

    A: torch.Tensor  # (N, r_max, d_in) float32
    G: torch.Tensor  # (N, r_max, r_max) float32, c^2 B^T B
    B: torch.Tensor | None  # (N, d_out, r_max) float32, c B (entropy signal only)
    present: torch.Tensor  # (N,) bool: the adapter adapts this module

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (self.A, self.G, self.B) if t is not None)


class RoutingIndex:
    """Float32 probe factors of every adapter at every module whose last name is in `modules`.

    Built one adapter at a time (`add`, in pool order, then `finish`), so that a pool is never
    held in memory whole: only the index's share of each adapter stays. Given the pool's size and
    every indexed path's shape (`n`, `shapes`: path -> (largest rank, d_in, d_out), from the files'
    headers), the stacked tensors are allocated once on `device` and filled in place, never held
    twice; without them the pieces are kept and stacked at `finish`."""

    def __init__(self, modules: tuple[str, ...], with_B: bool, device: torch.device, n: int | None = None,
                 shapes: Mapping[str, tuple[int, int, int]] | None = None):
        self.modules, self.with_B, self.device = tuple(modules), with_B, device
        self._held: list[dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]] = []
        self.factors: dict[str, ProbeFactors] = {}
        self._filled: dict[str, ProbeFactors] | None = None
        self._added = 0
        if n is not None and shapes is not None:
            self._filled = {
                p: ProbeFactors(A=torch.zeros(n, r, d_in, device=device), G=torch.zeros(n, r, r, device=device),
                                B=torch.zeros(n, d_out, r, device=device) if with_B else None,
                                present=torch.zeros(n, dtype=torch.bool, device=device))
                for p, (r, d_in, d_out) in sorted(shapes.items()) if p.rsplit(".", 1)[-1] in self.modules}

    def add(self, adapter: Adapter) -> None:
        """Keep `adapter`'s probe factors (the next pool index)."""
        held = {}
        for path, f in adapter.factors.items():
            if path.rsplit(".", 1)[-1] not in self.modules:
                continue
            cB = f.B.double() * f.scale  # (d_out, r)
            A, G, B = f.A.float(), (cB.T @ cB).float(), cB.float() if self.with_B else None  # G summed in float64
            if self._filled is None:
                held[path] = (A.clone(), G, B)
                continue
            into, r = self._filled.get(path), f.rank
            if into is None or r > into.A.shape[1] or tuple(A.shape[1:]) != tuple(into.A.shape[2:]):
                raise AdapterError(f"adapter {adapter.name!r}: module {path!r} (rank {r}) differs from its file's "
                                   "header read when the pool was listed; keep adapter files unchanged while a "
                                   "job runs")
            i = self._added
            into.A[i, :r].copy_(A)
            into.G[i, :r, :r].copy_(G)
            if into.B is not None:
                into.B[i, :, :r].copy_(B)
            into.present[i] = True
        if self._filled is None:
            self._held.append(held)
        self._added += 1

    def finish(self) -> "RoutingIndex":
        """Stack what `add` kept, per module path, zero-padded to its largest rank (or take the
        tensors filled in place)."""
        if self._filled is not None:
            n = next(iter(self._filled.values())).A.shape[0] if self._filled else self._added
            if self._added != n:
                raise ValueError(f"the routing index was sized for {n} adapters, {self._added} were added")
            self.factors = {p: f for p, f in self._filled.items() if bool(f.present.any())}
            self._filled = None
            return self
        paths = sorted({p for held in self._held for p in held})
        self.factors = {p: self._stack(p) for p in paths}
        self._held = []
        return self

    def _stack(self, path: str) -> ProbeFactors:
        held = [h.get(path) for h in self._held]
        first = next(f for f in held if f is not None)
        n, r_max = len(held), max(f[0].shape[0] for f in held if f is not None)
        d_in = first[0].shape[1]
        A = torch.zeros(n, r_max, d_in)  # (N, r_max, d_in)
        G = torch.zeros(n, r_max, r_max)  # (N, r_max, r_max)
        B = torch.zeros(n, first[2].shape[0], r_max) if self.with_B else None  # (N, d_out, r_max)
        for i, f in enumerate(held):
            if f is None:
                continue
            r = f[0].shape[0]
            A[i, :r], G[i, :r, :r] = f[0], f[1]
            if B is not None:
                B[i, :, :r] = f[2]
        present = torch.tensor([f is not None for f in held])
        device = self.device
        return ProbeFactors(A=A.to(device), G=G.to(device), B=None if B is None else B.to(device),
                            present=present.to(device))

    @property
    def nbytes(self) -> int:
        return sum(f.nbytes for f in self.factors.values())

    def save(self, path: Path, names: tuple[str, ...]) -> None:
        """Write the finished index as one safetensors file (to a temporary name, then renamed, so a
        reader sees the whole file or none); `names`: the pool's adapters, in index order."""
        tensors = {}
        for p, f in self.factors.items():
            for k in ("A", "G", "B", "present"):
                if getattr(f, k) is not None:  # all float32 (present as 0/1): every tensor 4-byte aligned
                    tensors[f"{p}/{k}"] = getattr(f, k).float().contiguous().cpu()
        meta = {"format": INDEX_FORMAT, "modules": json.dumps(self.modules), "with_B": json.dumps(self.with_B),
                "names": json.dumps(list(names))}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, path)

    @classmethod
    def open(cls, path: Path, modules: tuple[str, ...], with_B: bool, device: torch.device,
             names: tuple[str, ...]) -> "RoutingIndex | None":
        """The index written by `save` (memory-mapped, then copied: see below), or None when the file is not
        there or was built for other modules, signal or adapters."""
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
        except (OSError, SafetensorError):
            return None
        if (meta.get("format") != INDEX_FORMAT or meta.get("modules") != json.dumps(tuple(modules))
                or meta.get("with_B") != json.dumps(with_B) or meta.get("names") != json.dumps(list(names))):
            return None
        try:
            tensors = _mapped(path)
        except (OSError, ValueError, KeyError, TypeError, RuntimeError):  # not a file `save` wrote: rebuilt
            return None
        # copied out of the mapping: kernels on memory of another alignment round differently, and the
        # scores must be bit for bit those of the index as built (routing a pure function of the row)
        tensors = {k: (t.bool() if k.endswith("/present") else t.clone()).to(device) for k, t in tensors.items()}
        index = cls(modules, with_B, device)
        paths = sorted({k.rsplit("/", 1)[0] for k in tensors})
        index.factors = {p: ProbeFactors(A=tensors[f"{p}/A"], G=tensors[f"{p}/G"], B=tensors.get(f"{p}/B"),
                                         present=tensors[f"{p}/present"]) for p in paths}
        return index

    def get(self, path: str) -> ProbeFactors:
        if path not in self.factors:
            raise ValueError(f"the routing index holds modules named {list(self.modules)}, not {path!r}; build "
                             "the pool with index_modules that include it")
        return self.factors[path]


def _mapped(path: Path) -> dict[str, torch.Tensor]:
    """The float32 tensors of a safetensors file as views of one copy-on-write memory map of it
    (pages shared with every process mapping the file, until written)."""
    size = path.stat().st_size
    with path.open("rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=size)
    flat = torch.tensor([], dtype=torch.float32).set_(storage, 0, (size // 4,))  # as float32 (8 + n: 8-aligned)
    out = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        if info["dtype"] != "F32" or (8 + n + begin) % 4:
            raise ValueError(f"{path}: tensor {key!r} is not an aligned float32 tensor; delete the file to rebuild it")
        out[key] = flat[(8 + n + begin) // 4:(8 + n + end) // 4].view(info["shape"])
    return out


def pair_scores(h: torch.Tensor, f: ProbeFactors, signal: str) -> torch.Tensor:
    """LOGO_SPEC 1.3-1.4 at one (block, module) pair: (B, N) scores, 0 for adapters lacking the module.

    Semantics:
        for b, i:  z = A_i @ h[b]                               # (r,)
                   s[b, i] = sqrt(z^T G_i z)  = ||c_i B_i z||   (norm)
                   s[b, i] = 1 / (H(softmax(c_i B_i z)) + 1e-6) (entropy)
    """
    out = []
    for start in range(0, f.A.shape[0], SCORE_CHUNK):
        chunk = slice(start, start + SCORE_CHUNK)
        z = torch.einsum("bd,nrd->bnr", h, f.A[chunk])  # (B, n, r)
        if signal == "norm":
            Gz = torch.einsum("nrs,bns->bnr", f.G[chunk], z)  # (B, n, r)
            s = (z * Gz).sum(dim=-1).clamp(min=0.0).sqrt()  # (B, n)
        else:
            if f.B is None:
                raise ValueError("the entropy signal needs an index built with B factors (with_B=True)")
            o = torch.einsum("bnr,nor->bno", z, f.B[chunk])  # (B, n, d_out)
            p = o.softmax(dim=-1)
            s = 1.0 / (-(p * torch.log(p + 1e-8)).sum(dim=-1) + 1e-6)  # (B, n)
        out.append(torch.where(f.present[chunk], s, torch.zeros_like(s)))
    return torch.cat(out, dim=1)  # (B, N)
