"""The per-row output-space mixture (LOGO_SPEC section 2): reference, fast path, and the layer.

Every adapted Linear of the base model is replaced by a `MixtureLinear` that adds, for each group of
rows, the mixture of the group's adapters. Which adapters and weights apply is held in one
`MixtureState` shared by all layers of a model and set by the engine around each generate call; with
no plan set, the layer is exactly the base layer (this is how the probe runs with adapters off).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn


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


def mixture_fast(x: torch.Tensor, A_U: torch.Tensor, B_U: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """Two matrix products with the per-row weights between them.

    Semantics:
        h[b, t, j]     = sum_d x[b, t, d] * A_U[j, d]          (every column j of the union)
        delta[b, t, o] = sum_j h[b, t, j] * W[b, j] * B_U[o, j]

    x: (B, T, d_in); A_U: (C, d_in) the union's stacked A rows; B_U: (d_out, C) the union's stacked B
    columns with each adapter's scale c_i folded in; W: (B, C) with w_{b,i} on adapter i's columns.
    """
    h = x @ A_U.T  # (B, T, C)
    h = h * W.unsqueeze(1)  # (B, T, C)
    return h @ B_U.T  # (B, T, d_out)


def mixture_add_(y: torch.Tensor, x: torch.Tensor, A_U: torch.Tensor, B_U: torch.Tensor, W: torch.Tensor) -> None:
    """`y += mixture_fast(x, A_U, B_U, W)` in place, with one temporary and three kernels.

    y: (B, T, d_out), contiguous, same dtype as the factors; other shapes as in `mixture_fast`.
    """
    rows, d_out = x.shape[0], y.shape[-1]
    h = x.reshape(-1, x.shape[-1]) @ A_U.T  # (B*T, C)
    h.view(rows, -1, h.shape[-1]).mul_(W.unsqueeze(1))  # (B, T, C)
    y.view(-1, d_out).addmm_(h, B_U.T)  # (B*T, d_out)


@dataclass(frozen=True)
class GroupTerm:
    """One group's share of the mixture at one module: rows [start, stop) of the batch."""

    rows: slice
    A: torch.Tensor  # (C, d_in)
    B: torch.Tensor  # (d_out, C)
    W: torch.Tensor  # (rows, C)


@dataclass
class MixtureState:
    """What the mixture layers of one model apply: module path -> group terms, or None (adapters off)."""

    plan: dict[str, list[GroupTerm]] | None = None
    """Terms of every forward pass (the prompt's prefill; also decode steps when `decode_plan` is None)."""
    decode_plan: dict[str, list[GroupTerm]] | None = None
    """Terms of passes with one token per row (decode steps), when they are grouped differently."""
    timed: bool = False
    """Accumulate per-group seconds in `group_seconds` (synchronises the device: slower on GPU)."""
    group_seconds: list[float] = field(default_factory=list)


class MixtureLinear(nn.Module):
    """A base Linear plus, per group of rows, the weighted sum of the group's LoRA deltas."""

    def __init__(self, base_layer: nn.Linear, key: str, state: MixtureState):
        super().__init__()
        self.base_layer, self.key, self.state = base_layer, key, state

    @property
    def weight(self) -> torch.Tensor:  # some model code reads .weight of projection layers
        return self.base_layer.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        plan = self.state.plan
        if plan is None:
            return y
        if self.state.decode_plan is not None and x.dim() == 3 and x.shape[1] == 1:
            plan = self.state.decode_plan
        terms = plan.get(self.key)
        if not terms:
            return y
        in_place = y.is_contiguous() and y.dtype == x.dtype
        for g, term in enumerate(terms):
            start = time.perf_counter() if self.state.timed else 0.0
            xs = x[term.rows]  # (rows, T, d_in)
            if in_place and isinstance(term.rows, slice) and term.A.dtype == y.dtype:
                mixture_add_(y[term.rows], xs, term.A, term.B, term.W)  # a slice of y is a view
            else:
                y[term.rows] += mixture_fast(xs, term.A, term.B, term.W).to(y.dtype)
            if self.state.timed:
                if y.is_cuda:
                    torch.cuda.synchronize(y.device)
                self.state.group_seconds[g] += time.perf_counter() - start
        return y


def install_mixture_layers(model: nn.Module, modules: list[str], state: MixtureState) -> None:
    """Replace each Linear at the given paths by a MixtureLinear bound to `state` (idempotent)."""
    for path in modules:
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        current = getattr(parent, child)
        base_layer = current.base_layer if isinstance(current, MixtureLinear) else current
        setattr(parent, child, MixtureLinear(base_layer, path, state))
