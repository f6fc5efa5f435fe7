"""Calibrated routing in the quality benchmark: raw vs ratio vs zscore scores.

For each probe setting (q_proj, v_proj, both combined, at the last block; q_proj at a middle block)
and each calibration source (a seeded sample of the evaluated prompts themselves, `input`, as a job
would draw from its own input; or the shipped task-neutral `reference` set), it measures routing
accuracy on two mixes of held-out prompts: `balanced` (every task alike) and `skewed` (most prompts
from one task, where calibrating on the input sample raises the majority adapter's mean and may
penalise it). Exact match is measured for the settings named in `StudyConfig.em`.

Statistics come from `actors.calibration.compute_stats` and scores from `Router.raw_scores` /
`CalibrationStats.apply`, exactly what the engine routes with.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import torch

from actors import LoGoEngine, Router, Routing, RoutingConfig
from actors.calibration import CalibrationStats, compute_stats, reference_prompts
from jobs.demo.data import SplitConfig, task_split
from jobs.demo.methods import ProbeSetting

VARIANTS = (("raw", None), ("ratio", "input"), ("ratio", "reference"), ("zscore", "input"), ("zscore", "reference"))


@dataclass(frozen=True)
class StudyConfig:
    """What the calibration study measures."""

    probes: tuple[ProbeSetting, ...] = (
        ProbeSetting("q_proj"), ProbeSetting("v_proj", probe_module="v_proj"),
        ProbeSetting("q+v", probe_module=("q_proj", "v_proj")), ProbeSetting("q_proj mid", probe_layer=15))
    """Probe settings compared (labels are used in the tables)."""
    input_sample: int = 64
    """Prompts drawn (seeded) from the evaluated mix for `input` calibration."""
    skew_task: str = "review_sentiment"
    """The majority task of the skewed mix."""
    skew_share: float = 0.7
    """Share of the skewed mix taken by `skew_task`."""
    skew_rows: int = 50
    """Prompts in the skewed mix."""
    em: tuple[tuple[str, str, int], ...] = (
        ("q_proj", "raw", 1), ("q_proj", "ratio/input", 1), ("q_proj", "ratio/input", 3), ("q_proj", "ratio/reference", 1),
        ("q_proj", "zscore/input", 1), ("q_proj", "zscore/reference", 1),
        ("q_proj", "ratio/reference", 3), ("q_proj", "zscore/reference", 3),
        ("q+v", "ratio/input", 1), ("q+v", "ratio/reference", 1), ("v_proj", "ratio/reference", 1))
    """(probe label, variant, k) whose exact match is measured on both mixes (the rest: routing only)."""
    reference_prompts: int | None = None
    """Use only the first this many shipped reference prompts (None: all of them)."""
    seed: int = 0
    """Seed of the input sample and of the skewed mix's order."""


def skewed_rows(cfg: StudyConfig, tasks: tuple[str, ...]) -> list[dict]:
    """`skew_rows` test prompts, `skew_share` of them from `skew_task`, the rest spread over the others."""
    majority = round(cfg.skew_rows * cfg.skew_share)
    rows = task_split(cfg.skew_task, "test", SplitConfig())[:majority]
    others = [t for t in tasks if t != cfg.skew_task]
    per_task = {t: task_split(t, "test", SplitConfig()) for t in others}
    for i in range(cfg.skew_rows - majority):
        rows.append(per_task[others[i % len(others)]][i // len(others)])
    random.Random(cfg.seed).shuffle(rows)
    return rows


def variant_scores(raw: torch.Tensor, score: str, stats: CalibrationStats | None) -> torch.Tensor:
    """(rows, M, N) raw scores -> (rows, N) routing scores of one variant."""
    raw = raw.double()
    return (raw if score == "raw" else stats.apply(raw, score)).sum(dim=1)


def run_study(engine: LoGoEngine, mixes: dict[str, tuple[list[dict], list[list[int]]]],
              generate: Callable[[str, list[dict], list[list[int]], list[Routing]], float],
              tokenizer, cfg: StudyConfig = StudyConfig(), log: Callable[[str], None] = print) -> dict:
    """Routing accuracy for every (mix, probe, variant); exact match for `cfg.em`.

    `mixes`: name -> (rows with a `task`, token ids). `generate(name, rows, seqs, routings)` runs
    the engine and returns the exact match.
    """
    pool, n = engine.pool, len(engine.pool)
    reference = [tokenizer(p)["input_ids"] for p in reference_prompts()[: cfg.reference_prompts]]
    out: dict[str, dict] = {}
    for probe in cfg.probes:
        config = RoutingConfig(k=n, probe_layer=probe.probe_layer, probe_module=probe.probe_module,
                               probe_input=probe.probe_input)
        router = Router(engine.model, pool, config)
        ref_stats = compute_stats(router, reference, "reference")
        for mix, (rows, seqs) in mixes.items():
            raw = torch.cat([router.raw_scores(router.probe(*engine.pad(seqs[i:i + 32])))
                             for i in range(0, len(seqs), 32)])  # (rows, M, N)
            sample = random.Random(cfg.seed).sample(seqs, min(cfg.input_sample, len(seqs)))
            stats = {"input": compute_stats(router, sample, "input sample", cfg.seed), "reference": ref_stats}
            own = [pool.index(r["task"]) for r in rows]
            for score, source in VARIANTS:
                variant = score if source is None else f"{score}/{source}"
                scores = variant_scores(raw, score, stats.get(source))  # (rows, N)
                top1 = scores.argmax(dim=1).tolist()
                hits = [a == o for a, o in zip(top1, own)]
                entry = {"routing_accuracy": sum(hits) / len(hits),
                         "top1_counts": {pool.names[i]: top1.count(i) for i in sorted(set(top1))}}
                if mix == "skewed":
                    major = [h for h, r in zip(hits, rows) if r["task"] == cfg.skew_task]
                    minor = [h for h, r in zip(hits, rows) if r["task"] != cfg.skew_task]
                    entry["routing_accuracy_majority"] = sum(major) / len(major)
                    entry["routing_accuracy_minority"] = sum(minor) / len(minor)
                for label, v, k in cfg.em:
                    if label == probe.label and v == variant:
                        routings = Router(engine.model, pool, RoutingConfig(
                            k=k, probe_layer=probe.probe_layer, probe_module=probe.probe_module,
                            probe_input=probe.probe_input)).select(scores)
                        entry[f"exact_match_k{k}"] = generate(f"{mix}: {variant} [{probe.label}] k={k}",
                                                              rows, seqs, routings)
                out.setdefault(mix, {}).setdefault(probe.label, {})[variant] = entry
                log(f"calibration {mix:<8} {probe.label:<10} {variant:<17} routing "
                    f"{entry['routing_accuracy']:.3f}")
    return {"config": {"input_sample": cfg.input_sample, "skew_task": cfg.skew_task, "skew_share": cfg.skew_share,
                       "skew_rows": cfg.skew_rows, "reference_prompts": len(reference), "seed": cfg.seed},
            "results": out}
