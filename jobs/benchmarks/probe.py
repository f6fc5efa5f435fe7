"""The routing probe's cost per prompt against the pool size: the paper's probe against the default.

    logo-batch bench --probe [--threads 1]

On the SmolLM2-135M shape (30 blocks, hidden 576; random weights, the cost does not depend on them)
with rank-16 adapters on q_proj and v_proj, for pools of N = 8, 256 and 1,000 adapters: the time
per prompt of routing a batch (the probe pass plus scoring every adapter) with the paper's setting
(raw norm at q_proj of the last block: one pair) and with the default (calibrated z-scores summed
over q_proj and v_proj of every block: 60 pairs), and the routing index's memory beside the pool's.
The clock is the process's CPU time (median of rounds), so other jobs on a shared machine do not
distort one setting more than the other.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import replace

import torch

from actors.calibration import compute_stats
from actors.pool import AdapterPool
from actors.options import PAPER_ROUTING, RoutingConfig
from actors.router import Router
from jobs.benchmarks.config import SMOLLM2, Regime
from jobs.benchmarks.models import prompts, random_model, synthetic_pool

POOLS = (8, 256, 1000)
SHAPE = replace(SMOLLM2, pretrained="")
REGIME = Regime("short prompts", prompt_min=16, prompt_max=48, new_tokens=1)  # scoring's share is largest


def _per_prompt(router: Router, pad, seqs: list[list[int]], batch: int, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t0 = time.process_time()
        for start in range(0, len(seqs), batch):
            router.route(*pad(seqs[start:start + batch]))
        times.append((time.process_time() - t0) / len(seqs))
    return statistics.median(times)


def run(pools: tuple[int, ...] = POOLS, n_prompts: int = 16, batch: int = 8, rounds: int = 3,
        log=print) -> list[dict]:
    model = random_model(SHAPE, seed=0)
    seqs = prompts(REGIME, n_prompts, SHAPE.vocab, seed=1)

    def pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(map(len, rows))
        ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        return ids, mask

    out = []
    for n in pools:
        adapters = synthetic_pool(model, SHAPE, n, seed=2)
        pool = AdapterPool(adapters, model, torch.bfloat16, torch.device("cpu"))
        del adapters
        paper = Router(model, pool, RoutingConfig(**PAPER_ROUTING))
        default = RoutingConfig(k=min(20, n))
        raw = Router(model, pool, replace(default, calibration_score="raw", min_confidence=None, uncertain_below=None))
        stats = compute_stats(raw, seqs[:8], "bench sample")
        ours = Router(model, pool, default, stats)
        row = {"pool": n, "pairs_paper": len(paper.pairs), "pairs_default": len(ours.pairs),
               "paper_ms": 1e3 * _per_prompt(paper, pad, seqs, batch, rounds),
               "default_ms": 1e3 * _per_prompt(ours, pad, seqs, batch, rounds),
               "index_mib": pool.routing_index.nbytes / 2**20, "pool_mib": pool.nbytes / 2**20}
        row["ratio"] = row["default_ms"] / row["paper_ms"]
        log(f"  probe N={n}: paper {row['paper_ms']:.1f} ms/prompt, default {row['default_ms']:.1f} ms/prompt")
        out.append(row)
        del pool, paper, raw, ours
    return out


def table(rows: list[dict]) -> str:
    lines = ["| N | paper probe (1 pair) | default probe (60 pairs) | default / paper | routing index | pool (bf16) |",
             "|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['pool']} | {r['paper_ms']:.1f} ms | {r['default_ms']:.1f} ms | {r['ratio']:.2f}x | "
                     f"{r['index_mib']:.0f} MiB | {r['pool_mib']:.0f} MiB |")
    return "\n".join(lines)
