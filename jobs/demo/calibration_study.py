"""Calibrated routing in the quality benchmark: raw vs ratio vs zscore, over blocks and modules.

For each probe setting (blocks: the last, the last 4, the last 8 or all; modules: q_proj, v_proj or
both; the (block, module) pairs scores are summed over) and each calibration source (a seeded sample
of the evaluated prompts themselves, `input`, as a job draws from its own input; or the shipped
task-neutral `reference` set), it measures routing accuracy on two mixes of held-out prompts:
`balanced` (every task alike) and `skewed` (most prompts from one task, where calibrating on the
input sample raises the majority adapter's mean and may penalise it). Exact match is measured for
the (setting, variant, k) named in `StudyConfig.em`.

Every prompt is probed once at every pair of the widest setting; each setting reads its pairs'
columns. Per-pair statistics are computed one prompt at a time and are the same whichever subset of
pairs reads them, so this is exactly what the engine routes with for each setting
(`Router.combine`, `CalibrationStats.apply`).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from actors import LoGoEngine, Router, Routing, RoutingConfig
from actors.calibration import CalibrationStats, compute_stats, reference_prompts
from jobs.demo.data import SplitConfig, task_split

VARIANTS = (("raw", None), ("ratio", "input"), ("ratio", "reference"), ("zscore", "input"), ("zscore", "reference"))
BLOCKS = {"last": -1, "last 4": (-4, -3, -2, -1), "last 8": tuple(range(-8, 0)), "all": "all"}
MODULES = {"q_proj": "q_proj", "v_proj": "v_proj", "q+v": ("q_proj", "v_proj")}


@dataclass(frozen=True)
class StudyConfig:
    """What the calibration study measures."""

    blocks: tuple[str, ...] = tuple(BLOCKS)
    """Block spans compared (keys of BLOCKS)."""
    modules: tuple[str, ...] = tuple(MODULES)
    """Module sets compared (keys of MODULES); a setting is labelled `<modules> [<blocks>]`."""
    input_sample: int = 64
    """Prompts drawn (seeded) from the evaluated mix for `input` calibration."""
    skew_task: str = "review_sentiment"
    """The majority task of the skewed mix."""
    skew_share: float = 0.7
    """Share of the skewed mix taken by `skew_task`."""
    skew_rows: int = 50
    """Prompts in the skewed mix."""
    em: tuple[tuple[str, str, int], ...] = (
        ("q_proj [last]", "raw", 20), ("q_proj [last]", "raw", 3), ("q_proj [last]", "ratio/input", 1),
        ("q+v [all]", "zscore/input", 1), ("q+v [all]", "zscore/input", 3), ("q+v [all]", "zscore/input", 5),
        ("q+v [all]", "zscore/input", 20), ("q+v [all]", "ratio/input", 1), ("q+v [all]", "ratio/input", 3),
        ("q+v [all]", "zscore/reference", 1), ("q+v [all]", "ratio/reference", 1))
    """(setting label, variant, k) whose exact match is measured on both mixes (the rest: routing only)."""
    reference_prompts: int | None = None
    """Use only the first this many shipped reference prompts (None: all of them)."""
    seed: int = 0
    """Seed of the input sample and of the skewed mix's order."""

    def settings(self) -> dict[str, RoutingConfig]:
        """Label -> routing configuration (raw scores, k = 1) of every compared probe setting."""
        return {f"{m} [{b}]": RoutingConfig(k=1, uncertain_below=None, probe_layers=BLOCKS[b], probe_module=MODULES[m],
                                            calibration_score="raw")
                for b in self.blocks for m in self.modules}


def subset(stats: CalibrationStats, pairs: list[str]) -> CalibrationStats:
    """The statistics of some of the pairs (per-pair statistics do not depend on the other pairs)."""
    rows = [stats.probe["pairs"].index(p) for p in pairs]
    return replace(stats, probe={**stats.probe, "pairs": list(pairs)},
                   mean=tuple(stats.mean[r] for r in rows), std=tuple(stats.std[r] for r in rows))


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


def run_study(engine: LoGoEngine, mixes: dict[str, tuple[list[dict], list[list[int]]]],
              generate: Callable[[str, list[dict], list[list[int]], list[Routing]], float],
              tokenizer, cfg: StudyConfig = StudyConfig(), log: Callable[[str], None] = print) -> dict:
    """Routing accuracy for every (mix, setting, variant); exact match for `cfg.em`.

    `mixes`: name -> (rows with a `task`, token ids). `generate(name, rows, seqs, routings)` runs
    the engine and returns the exact match.
    """
    pool, n = engine.pool, len(engine.pool)
    modules = tuple(dict.fromkeys(m for key in cfg.modules for m in RoutingConfig(probe_module=MODULES[key]).probe_modules))
    widest = Router(engine.model, pool, RoutingConfig(k=n, uncertain_below=None, probe_layers="all", probe_module=modules,
                                                      calibration_score="raw"))
    all_pairs = widest.describe()["pairs"]
    reference = [tokenizer(p)["input_ids"] for p in reference_prompts()[: cfg.reference_prompts]]
    ref_stats = compute_stats(widest, reference, "reference")
    out: dict[str, dict] = {}
    for mix, (rows, seqs) in mixes.items():
        raw = torch.cat([widest.raw_scores(widest.probe(*engine.pad(seqs[i:i + 32])))
                         for i in range(0, len(seqs), 32)])  # (rows, P_all, N)
        sample = random.Random(cfg.seed).sample(seqs, min(cfg.input_sample, len(seqs)))
        stats = {"input": compute_stats(widest, sample, "input sample", cfg.seed), "reference": ref_stats}
        own = [pool.index(r["task"]) for r in rows]
        for label, config in cfg.settings().items():
            pairs = Router(engine.model, pool, config).describe()["pairs"]
            columns = raw[:, [all_pairs.index(p) for p in pairs]]  # (rows, P, N)
            for score, source in VARIANTS:
                variant = score if source is None else f"{score}/{source}"
                calibration = None if source is None else subset(stats[source], pairs)
                router = Router(engine.model, pool, replace(config, k=n, calibration_score=score), calibration)
                scores = router.combine(columns)  # (rows, N)
                top1 = [r.indices[0] for r in router.select(scores)]
                hits = [a == o for a, o in zip(top1, own)]
                entry = {"routing_accuracy": sum(hits) / len(hits),
                         "top1_counts": {pool.names[i]: top1.count(i) for i in sorted(set(top1))}}
                if mix == "skewed":
                    major = [h for h, r in zip(hits, rows) if r["task"] == cfg.skew_task]
                    minor = [h for h, r in zip(hits, rows) if r["task"] != cfg.skew_task]
                    entry["routing_accuracy_majority"] = sum(major) / len(major)
                    entry["routing_accuracy_minority"] = sum(minor) / len(minor)
                for em_label, v, k in cfg.em:
                    if em_label == label and v == variant:
                        routings = Router(engine.model, pool, replace(config, k=k, calibration_score=score),
                                          calibration).select(scores)
                        entry[f"exact_match_k{k}"] = generate(f"{mix}: {variant} {label} k={k}",
                                                              rows, seqs, routings)
                out.setdefault(mix, {}).setdefault(label, {})[variant] = entry
                log(f"calibration {mix:<8} {label:<16} {variant:<17} routing {entry['routing_accuracy']:.3f}")
    return {"config": {"input_sample": cfg.input_sample, "skew_task": cfg.skew_task, "skew_share": cfg.skew_share,
                       "skew_rows": cfg.skew_rows, "reference_prompts": len(reference), "seed": cfg.seed},
            "results": out}
