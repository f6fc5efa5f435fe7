"""Per-adapter calibration of routing scores from unlabeled prompts.

The raw LoGo score of an adapter mixes how well it fits the prompt with how large its outputs are
overall; an adapter with a large gain wins almost every prompt. Statistics of each adapter's score
over a calibration set of unlabeled prompts remove that gain, per scored (block, module) pair p:

    ratio:   s'_{i,p} = s_{i,p} / mean_{i,p}
    zscore:  s'_{i,p} = (s_{i,p} - mean_{i,p}) / std_{i,p}

Statistics are computed with the same probe as routing, one prompt at a time, and summed with
`math.fsum` (exactly rounded, so independent of order): the same prompts give the same statistics
however they are batched, split or distributed. They are fixed before any row is routed.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from actors.router import Router

REFERENCE_PROMPTS = Path(__file__).with_name("reference_prompts.json")


@dataclass(frozen=True)
class CalibrationStats:
    """Score statistics per (scored pair, adapter), and where they came from."""

    adapters: tuple[str, ...]
    probe: dict  # Router.describe(): signal, probe_input, pairs (module paths, block-major)
    mean: tuple[tuple[float, ...], ...]  # (P, N)
    std: tuple[tuple[float, ...], ...]  # (P, N)
    count: int  # prompts used
    source: str  # e.g. "input sample", "reference", a file path
    seed: int | None = None

    def check(self, adapters: tuple[str, ...], probe: dict) -> None:
        """Refuse statistics computed for another pool or another probe."""
        if tuple(self.adapters) != tuple(adapters):
            missing = sorted(set(adapters) - set(self.adapters))
            extra = sorted(set(self.adapters) - set(adapters))
            raise ValueError(f"calibration statistics are for another adapter pool (missing {missing}, extra "
                             f"{extra}); recompute them with `logo-batch calibrate` on this pool")
        if self.probe != probe:
            mine, theirs = self.probe.get("pairs"), probe.get("pairs")
            pairs = (f" ({len(mine)} pairs, from {mine[0]} to {mine[-1]}, against {len(theirs)} from {theirs[0]} "
                     f"to {theirs[-1]})" if mine and theirs and mine != theirs else "")
            raise ValueError(f"calibration statistics were computed with probe {self.describe_probe()}, but routing "
                             f"uses {_brief(probe)}{pairs}; recompute them with the routing options of this job "
                             "(probe_layers, probe_module, probe_input, signal)")

    def describe_probe(self) -> str:
        return _brief(self.probe)

    def valid(self, mode: str) -> torch.Tensor:
        """(P, N) bool: where the statistics can calibrate a score (mean > 0 for ratio, std > 0 for zscore)."""
        values = self.mean if mode == "ratio" else self.std
        return torch.tensor(values, dtype=torch.float64) > 0

    def apply(self, scores: torch.Tensor, mode: str) -> torch.Tensor:
        """scores (B, P, N) -> calibrated scores (B, P, N); 0 where the statistics are degenerate."""
        mean = torch.tensor(self.mean, dtype=scores.dtype, device=scores.device)  # (P, N)
        std = torch.tensor(self.std, dtype=scores.dtype, device=scores.device)  # (P, N)
        if mode == "ratio":
            out = scores / mean.clamp(min=1e-30)
            return torch.where(mean > 0, out, torch.zeros_like(out))
        if mode == "zscore":
            out = (scores - mean) / std.clamp(min=1e-30)
            return torch.where(std > 0, out, torch.zeros_like(out))
        raise ValueError(f"calibration mode {mode!r} is not known; use 'ratio' or 'zscore'")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def from_dict(cls, data: dict) -> "CalibrationStats":
        try:
            return cls(adapters=tuple(data["adapters"]), probe=dict(data["probe"]),
                       mean=tuple(tuple(row) for row in data["mean"]),
                       std=tuple(tuple(row) for row in data["std"]), count=int(data["count"]),
                       source=str(data["source"]), seed=data.get("seed"))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"calibration statistics are malformed ({exc!r}); regenerate them with "
                             "`logo-batch calibrate`") from exc

    @classmethod
    def load(cls, path: str | Path) -> "CalibrationStats":
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"calibration={str(path)!r}: no such statistics file")
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except json.JSONDecodeError as exc:
            raise ValueError(f"calibration file {path} is not JSON ({exc})") from exc


def _brief(probe: dict) -> str:
    """A probe description short enough for a message (pairs counted, not listed)."""
    brief = {k: v for k, v in probe.items() if k != "pairs"}
    if "pairs" in probe:
        brief["pairs"] = len(probe["pairs"])
    return str(brief)


REFERENCE_TOKENS = 512
"""The most tokens of a reference prompt that calibration reads (its end: the answer cue stays)."""


def reference_tokens(context: int) -> int:
    """Tokens kept of each reference prompt: at most `REFERENCE_TOKENS` and half the model's context.
    Independent of max_new_tokens, so a job's driver and its actors calibrate on the same tokens; no
    reference prompt is ever left out (a model of a short context reads the end of each)."""
    return max(1, min(REFERENCE_TOKENS, context // 2))


def reference_prompts() -> list[str]:
    """The shipped calibration prompts (BIG-bench prompts of tasks outside both shipped pools: jobs/demo/reference_set.py)."""
    return json.loads(REFERENCE_PROMPTS.read_text())


def compute_stats(router: Router, seqs: list[list[int]], source: str, seed: int | None = None) -> CalibrationStats:
    """Mean and standard deviation of each adapter's raw score over tokenised prompts."""
    if not seqs:
        raise ValueError("calibration needs at least one prompt")
    return stats_from_rows(router, [prompt_scores(router, seq) for seq in seqs], source, seed)


def prompt_scores(router: Router, seq: list[int]) -> torch.Tensor:
    """One prompt's raw scores (P, N), float64 on the CPU; alone, so no padding and no batch effect."""
    ids = torch.tensor([seq], device=router.informative.device)
    return router.raw_scores(router.probe(ids, torch.ones_like(ids)))[0].double().cpu()


def stats_from_rows(router: Router, rows: list[torch.Tensor], source: str, seed: int | None = None) -> CalibrationStats:
    """Statistics from per-prompt raw scores (`prompt_scores`), exactly summed: any order gives the same."""
    if not rows:
        raise ValueError("calibration needs at least one prompt")
    columns = torch.stack(rows).flatten(1).T.tolist()  # (P * N) lists of one value per prompt
    means = [math.fsum(c) / len(rows) for c in columns]
    stds = [math.sqrt(math.fsum((v - m) ** 2 for v in c) / len(rows)) for c, m in zip(columns, means)]
    n_adapters = len(router.pool)
    mean = [means[j:j + n_adapters] for j in range(0, len(means), n_adapters)]  # (P, N)
    std = [stds[j:j + n_adapters] for j in range(0, len(stds), n_adapters)]
    return CalibrationStats(adapters=router.pool.names, probe=router.describe(),
                            mean=tuple(map(tuple, mean)), std=tuple(map(tuple, std)),
                            count=len(rows), source=source, seed=seed)
