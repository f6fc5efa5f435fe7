"""The methods of the quality benchmark, each expressed as one `Routing` per prompt.

Every method but the PEFT Arrow peer is "which adapters, with which weights, for this prompt";
the engine then generates all of them the same way (`LoGoEngine.generate`). LoGo routings come from
the engine's `Router`: the probe runs once per probe setting and signal, and the scores are reused
for every k and for the leave-one-out pool (the prompt's own adapter scored -inf, which selects
exactly what routing over the pool without it would select, since scores are per adapter).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from actors import LoGoEngine, Router, Routing, RoutingConfig


@dataclass(frozen=True)
class ProbeSetting:
    """Where the probe reads the prompt (everything of `RoutingConfig` except k and the signal); raw scores."""

    label: str
    """Short name used in method names, e.g. `last` or `mid`."""
    probe_layers: int | tuple[int, ...] | str = -1
    """Block(s) whose input is probed (negative counts from the end)."""
    probe_module: str | tuple[str, ...] = "q_proj"
    """Module(s) of that block whose LoRA outputs are scored (several: scores summed)."""
    probe_input: str = "residual"
    """`residual` (before the block's input norm) or `module_input` (after it)."""

    def routing_config(self, k: int, signal: str) -> RoutingConfig:
        return RoutingConfig(k=k, signal=signal, probe_layers=self.probe_layers, probe_module=self.probe_module,
                             probe_input=self.probe_input, calibration_score="raw")


def fixed_routing(engine: LoGoEngine, names: list[str], weights: list[float] | None = None) -> Routing:
    """A routing to the named adapters (uniform weights unless given); [] means the base model."""
    indices = tuple(engine.pool.index(n) for n in names)
    if weights is None:
        weights = [1.0 / len(names)] * len(names) if names else []
    return Routing(indices=indices, adapters=tuple(names), weights=tuple(weights))


def random_routings(engine: LoGoEngine, n_rows: int, k: int, seed: int) -> list[Routing]:
    """k adapters drawn uniformly per prompt (seeded), uniform weights."""
    rng = random.Random(seed)
    names = list(engine.pool.names)
    return [fixed_routing(engine, sorted(rng.sample(names, min(k, len(names))))) for _ in range(n_rows)]


@torch.inference_mode()
def probe_scores(engine: LoGoEngine, seqs: list[list[int]], setting: ProbeSetting, signal: str,
                 batch_size: int = 32) -> torch.Tensor:
    """The engine's routing scores (rows, N) for one probe setting and signal."""
    router = Router(engine.model, engine.pool, setting.routing_config(len(engine.pool), signal))
    parts = []
    for start in range(0, len(seqs), batch_size):
        ids, mask = engine.pad(seqs[start : start + batch_size])
        parts.append(router.scores(router.probe(ids, mask)))  # (b, N)
    return torch.cat(parts)  # (rows, N)


def select(engine: LoGoEngine, scores: torch.Tensor, setting: ProbeSetting, signal: str, k: int,
           exclude: list[int] | None = None) -> list[Routing]:
    """The engine's top-k selection and weights from precomputed scores.

    `exclude[row]` (a pool index) is removed from that row's candidates: leave-one-out.
    """
    n = len(engine.pool) - (1 if exclude is not None else 0)
    router = Router(engine.model, engine.pool, setting.routing_config(min(k, n), signal))
    if exclude is not None:
        scores = scores.clone()
        scores[torch.arange(len(exclude)), torch.tensor(exclude)] = float("-inf")
    return router.select(scores)
