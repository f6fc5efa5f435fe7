"""Per-adapter calibration of routing scores from unlabeled prompts.

The raw LoGo score of an adapter mixes how well it fits the prompt with how large its outputs are
overall; an adapter with a large gain wins almost every prompt. Statistics of each adapter's score
over a calibration set of unlabeled prompts remove that gain:

    ratio:   s'_i = s_i / mean_i
    zscore:  s'_i = (s_i - mean_i) / std_i

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
    """Score statistics per (probe module, adapter), and where they came from."""

    adapters: tuple[str, ...]
    probe: dict  # Router.describe(): signal, probe_layer, probe_modules, probe_input
    mean: tuple[tuple[float, ...], ...]  # (M, N)
    std: tuple[tuple[float, ...], ...]  # (M, N)
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
            raise ValueError(f"calibration statistics were computed with probe {self.probe}, but routing uses "
                             f"{probe}; recompute them with the routing options of this job")

    def apply(self, scores: torch.Tensor, mode: str) -> torch.Tensor:
        """scores (B, M, N) -> calibrated scores (B, M, N). Adapters with a zero mean/std score 0."""
        mean = torch.tensor(self.mean, dtype=scores.dtype, device=scores.device)  # (M, N)
        std = torch.tensor(self.std, dtype=scores.dtype, device=scores.device)  # (M, N)
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


def reference_prompts() -> list[str]:
    """The shipped, task-neutral calibration prompts."""
    return json.loads(REFERENCE_PROMPTS.read_text())


def compute_stats(router: Router, seqs: list[list[int]], source: str, seed: int | None = None) -> CalibrationStats:
    """Mean and standard deviation of each adapter's raw score over tokenised prompts."""
    if not seqs:
        raise ValueError("calibration needs at least one prompt")
    rows = []
    for seq in seqs:  # one at a time: no padding, so each row's score does not depend on the batch
        ids = torch.tensor([seq], device=router.present.device)
        rows.append(router.raw_scores(router.probe(ids, torch.ones_like(ids)))[0].double().cpu())  # (M, N)
    stacked = torch.stack(rows)  # (P, M, N)
    n_modules, n_adapters = stacked.shape[1:]
    mean = [[math.fsum(stacked[:, m, i].tolist()) / len(seqs) for i in range(n_adapters)] for m in range(n_modules)]
    std = [[math.sqrt(math.fsum((v - mean[m][i]) ** 2 for v in stacked[:, m, i].tolist()) / len(seqs))
            for i in range(n_adapters)] for m in range(n_modules)]
    return CalibrationStats(adapters=router.pool.names, probe=router.describe(),
                            mean=tuple(map(tuple, mean)), std=tuple(map(tuple, std)),
                            count=len(seqs), source=source, seed=seed)
