"""The per-row output-space mixture (LOGO_SPEC section 2): reference, slot path, and the layer.

Every adapted Linear of the base model is replaced by a `MixtureLinear` that adds each row's mixture
of its selected adapters. The pool keeps every resident adapter in a slot of per-module stacked
storage (`actors.pool`); one generate call's (row, adapter) pairs, sorted by slot, are a `SlotMix`,
built once per call. With it, a forward pass costs a fixed number of ops per adapted module
whatever the rows select: a gather of the pairs' inputs, a jagged grouped "shrink" and "expand"
over the slots (`torch.nn.functional.grouped_mm`), and a per-row sum. Which mixture applies is held
in one `MixtureState` shared by all layers of a model and set by the engine around each generate
call; with none set, the layer is exactly the base layer (this is how the probe runs with adapters off).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


# (device type, dtype) where grouped_mm runs, and runs faster than a loop over slots. On this CPU
# float16 runs too but 5x slower than the loop (1280 pairs over 64 slots, rank 16, 1024 wide:
# 145 ms against 29 ms for shrink and expand), so float16 takes the loop; CUDA wants bfloat16.
GROUPED_MM = {("cpu", torch.float32), ("cpu", torch.bfloat16), ("cuda", torch.bfloat16)}


def mixture_reference(
    x: torch.Tensor, factors: list[tuple[torch.Tensor, torch.Tensor, float] | None], weights: torch.Tensor
) -> torch.Tensor:
    """Plain loops over rows and adapters; the definition the fast path is held to.

    Semantics:
        for b in rows, for i in adapters with weights[b, i] != 0 and factors[i] = (A_i, B_i, c_i):
            delta[b] += weights[b, i] * c_i * (x[b] @ A_i^T) @ B_i^T

    x: (B, T, d_in); factors[i]: A_i (r_i, d_in), B_i (d_out, r_i), c_i, or None where adapter i does
    not adapt this module; weights: (B, N). Returns delta (B, T, d_out).
    """
    d_out = next(f[1].shape[0] for f in factors if f is not None)
    delta = x.new_zeros(*x.shape[:-1], d_out)  # (B, T, d_out)
    for b in range(x.shape[0]):
        for i, f in enumerate(factors):
            w = float(weights[b, i])
            if f is None or w == 0.0:
                continue
            A, B, c = f
            delta[b] += w * c * ((x[b] @ A.T) @ B.T)  # (T, r_i) -> (T, d_out)
    return delta


class SlotMix:
    """One generate call's mixture: every (row b, j-th selected adapter) pair, sorted by slot.

    Each row's selection is padded to K = the longest selection with weight-0 pairs (on the row's
    first slot), so the pairs are P = B*K and the per-row sum is a plain sum over K in selection
    order, whatever slots the adapters happen to occupy. Everything here is made once per call
    (P + B*K int32 indices, P weights, S int32 group ends: what a call sends to the device); a pass
    only reads it, so decode steps do no host synchronisation.
    """

    def __init__(self, slots: list[list[int]], weights: list[list[float]], n_slots: int,
                 device: torch.device, dtype: torch.dtype):
        self.rows, self.K = len(slots), max(1, max(len(s) for s in slots))
        K = self.K
        pair_slot: list[int] = []
        pair_weight: list[float] = []
        for s, w in zip(slots, weights):
            pair_slot += list(s) + [s[0] if s else 0] * (K - len(s))
            pair_weight += list(w) + [0.0] * (K - len(s))
        self.pairs = len(pair_slot)
        order = sorted(range(self.pairs), key=lambda p: (pair_slot[p], p))  # pairs by slot
        position = [0] * self.pairs
        for q, p in enumerate(order):
            position[p] = q
        counts = [0] * n_slots
        for s in pair_slot:
            counts[s] += 1
        ends, total = [], 0
        for c in counts:
            total += c
            ends.append(total)
        # host-side segments (slot, first pair, end pair) for the loop where grouped_mm does not run
        self.segments = [(s, e - c, e) for s, (c, e) in enumerate(zip(counts, ends)) if c]
        self.grouped = (torch.device(device).type, dtype) in GROUPED_MM
        as_int = dict(dtype=torch.int32)
        self.source = torch.tensor([p // K for p in order], **as_int).to(device)
        """(P,): the row of each sorted pair."""
        self.position = torch.tensor(position, **as_int).to(device)
        """(B*K,): the sorted position of row b's j-th pair, at b*K + j."""
        self.weights = torch.tensor([pair_weight[p] for p in order]).to(device, dtype).unsqueeze(1)
        """(P, 1): each sorted pair's weight, in the factors' dtype."""
        self.ends = torch.tensor(ends, **as_int).to(device)
        """(S,): cumulative pairs per slot (grouped_mm's group ends for one token per row)."""
        self.row_slots = torch.tensor(pair_slot, **as_int).to(device)
        """(B*K,): the slot of row b's j-th pair, at b*K + j (for passes of many tokens per row)."""
        self.row_weights = torch.tensor(pair_weight).to(device, dtype)
        """(B*K,): the weight of row b's j-th pair, at b*K + j."""
        self._offs = {1: self.ends}
        self._rank_weights: dict[int, torch.Tensor] = {}

    def offs(self, T: int) -> torch.Tensor:
        """Group ends for passes of T tokens per row, (S,) int32 (cached: the engine makes those of
        the prompt's width before generating)."""
        found = self._offs.get(T)
        if found is None:
            found = self._offs[T] = self.ends * T
        return found

    def rank_weights(self, r: int) -> torch.Tensor:
        """(B, 1, K*r): each row's pair weights, each repeated over its slot's r columns (cached)."""
        found = self._rank_weights.get(r)
        if found is None:
            found = self._rank_weights[r] = self.row_weights.repeat_interleave(r).view(self.rows, 1, -1)
        return found

    @property
    def nbytes(self) -> int:
        """Bytes this call holds on the device (indices, weights, group ends)."""
        tensors = (self.source, self.position, self.weights, self.row_slots, self.row_weights,
                   *self._offs.values(), *self._rank_weights.values())
        return sum(t.nbytes for t in tensors)

    def mm(self, a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor, T: int) -> torch.Tensor:
        """Jagged product over slots: rows of `a` (sorted pairs, T tokens each) times their slot's `b`.

        Semantics:
            out[q*T + t] = a[q*T + t] @ b[slot(q)]        for every sorted pair q and token t

        a: (P*T, m); b: (S, m, n). Returns (P*T, n).
        """
        if self.grouped:
            return F.grouped_mm(a, b, offs=offs)
        out = a.new_empty(a.shape[0], b.shape[-1])  # (P*T, n)
        for slot, start, stop in self.segments:
            torch.mm(a[start * T:stop * T], b[slot], out=out[start * T:stop * T])
        return out


def mixture_add_(y: torch.Tensor, x: torch.Tensor, A_t: torch.Tensor, B_t: torch.Tensor, mix: SlotMix) -> None:
    """`y += ` every row's mixture, in place, with a fixed number of ops whatever the selections
    (9 for one token per row: a decode step).

    Passes of more tokens per row than the slots' rank (a prompt's prefill) take `_rows_mix`
    instead: copying each row's K slots' factors (K*r rows) then costs less than copying each of
    its T tokens K times, which the pairs would.

    Semantics:
        for every pair p = (row b, j) with slot s and weight w:
            h_p = w * (x[b] @ A[s]^T)             (T, r)     shrink
            o_p = h_p @ cB[s]^T                   (T, d_out) expand (scale c folded into cB)
        y[b] += sum_j o_(b, j)

    y: (B, T, d_out); x: (B, T, d_in); A_t: (S, d_in, r), a transposed view of the slots' A
    (S, r, d_in); B_t: (S, r, d_out), the slots' cB transposed (stored so: on the CPU grouped_mm
    expands 30% faster from it than from a transposed view).
    """
    B, T, d_in = x.shape
    if T > A_t.shape[-1]:
        _rows_mix(y, x, A_t, B_t, mix)
        return
    P, K = mix.pairs, mix.K
    offs = mix.offs(T)
    xs = x.reshape(B, T * d_in).index_select(0, mix.source)  # (P, T*d_in)
    if xs.dtype != A_t.dtype:
        xs = xs.to(A_t.dtype)
    if T > 1:
        xs = xs.view(P * T, d_in)  # (P*T, d_in)
    h = mix.mm(xs, A_t, offs, T)  # (P*T, r)
    (h if T == 1 else h.view(P, T, -1)).mul_(mix.weights if T == 1 else mix.weights.unsqueeze(1))
    o = mix.mm(h, B_t, offs, T)  # (P*T, d_out)
    if T > 1:
        o = o.view(P, -1)  # (P, T*d_out)
    delta = o.index_select(0, mix.position).view(B, K, T, -1).sum(dim=1)  # (B, T, d_out)
    y += delta if delta.dtype == y.dtype else delta.to(y.dtype)


def _rows_mix(y: torch.Tensor, x: torch.Tensor, A_t: torch.Tensor, B_t: torch.Tensor, mix: SlotMix) -> None:
    """`y += ` every row's mixture by per-row products with its K slots' factors gathered.

    Semantics:
        A_b = [A[s_b0]; ...; A[s_b(K-1)]]          (K*r, d_in)  row b's slots, stacked
        cB_b = [cB[s_b0] ... cB[s_b(K-1)]]         (d_out, K*r)
        y[b] += ((x[b] @ A_b^T) * w_b) @ cB_b^T    w_b: each pair's weight over its r columns
    """
    B, T, _ = x.shape
    r = A_t.shape[-1]
    A_rows = A_t.transpose(1, 2).index_select(0, mix.row_slots).view(B, mix.K * r, -1)  # (B, K*r, d_in)
    h = torch.bmm(x if x.dtype == A_t.dtype else x.to(A_t.dtype), A_rows.transpose(1, 2))  # (B, T, K*r)
    h.mul_(mix.rank_weights(r))  # (B, T, K*r)
    B_rows = B_t.index_select(0, mix.row_slots).view(B, mix.K * r, -1)  # (B, K*r, d_out)
    delta = torch.bmm(h, B_rows)  # (B, T, d_out)
    y += delta if delta.dtype == y.dtype else delta.to(y.dtype)


@dataclass
class MixtureState:
    """What the mixture layers of one model apply: the slot storage, and the call's mixture or None."""

    storage: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    """Module path -> (A_t (S, d_in, r), B_t (S, r, d_out)): the pool's slot storage (`mixture_add_`)."""
    mix: dict[torch.device, SlotMix] | None = None
    """The rows' pairs of the generate call in progress, on each device holding slots (several with
    a device map); None: adapters off."""


class MixtureLinear(nn.Module):
    """A base Linear plus, for every row, the weighted sum of its selected adapters' LoRA deltas."""

    def __init__(self, base_layer: nn.Linear, key: str, state: MixtureState):
        super().__init__()
        self.base_layer, self.key, self.state = base_layer, key, state

    @property
    def weight(self) -> torch.Tensor:  # some model code reads .weight of projection layers
        return self.base_layer.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        mix = self.state.mix
        if mix is None:
            return y
        A_t, B_t = self.state.storage[self.key]
        mixture_add_(y, x, A_t, B_t, mix[A_t.device])
        return y


def install_mixture_layers(model: nn.Module, modules: list[str], state: MixtureState) -> None:
    """Replace each Linear at the given paths by a MixtureLinear bound to `state` (idempotent)."""
    for path in modules:
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        current = getattr(parent, child)
        base_layer = current.base_layer if isinstance(current, MixtureLinear) else current
        setattr(parent, child, MixtureLinear(base_layer, path, state))
