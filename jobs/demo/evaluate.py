"""`logo-batch eval`: the LoGo quality benchmark on the demo task suite and the shipped adapter pool.

On held-out prompts of every task, mixed, it measures exact match per task and overall for: the
base model; the oracle (each prompt's own task adapter); a uniform mixture of the whole pool;
random k; LoGo `norm` and `entropy` for k in {1, 3, 5, all}; other probe settings (a middle block,
the module input instead of the residual stream, v_proj instead of q_proj); leave-one-out (each
prompt's own adapter removed from the pool); and PEFT's Arrow routing as a peer. Routing accuracy
is the share of prompts whose top-scored adapter is their own task's. The model is loaded once;
each probe setting is probed once and its scores reused across k.

    logo-batch eval --out runs/demo-eval        # about 11 minutes on 2 CPU cores
"""

from __future__ import annotations

import copy
import datetime as dt
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from actors import AdapterPool, GenerationConfig, LoGoEngine, Routing, RoutingConfig
from jobs.demo.arrow import arrow_generate, arrow_model
from jobs.demo.calibration_study import StudyConfig, run_study, skewed_rows
from jobs.demo.data import SplitConfig, check_row, suite_split
from jobs.demo.methods import ProbeSetting, fixed_routing, probe_scores, random_routings, select
from jobs.demo.tasks import TASK_NAMES, extract_answer
from jobs.demo import ADAPTER_DIR

LAST = ProbeSetting("last")


@dataclass(frozen=True)
class EvalConfig:
    """What the benchmark runs."""

    per_task: int = 10
    """Held-out (test split) prompts per task."""
    tasks: tuple[str, ...] = TASK_NAMES
    """Tasks whose prompts are evaluated (the pool always holds every shipped adapter)."""
    ks: tuple[int, ...] = (1, 3, 5, 0)
    """Values of k for LoGo at the default probe and for leave-one-out; 0 means the whole pool."""
    alt_ks: tuple[int, ...] = (1, 3)
    """Values of k for the other probe settings."""
    random_ks: tuple[int, ...] = (1, 3, 5)
    """Values of k for the random baseline."""
    mid_layer: int = 15
    """The middle block probed by the `mid` setting (SmolLM2-135M has 30)."""
    arrow_top_k: int = 3
    """Adapters per token for PEFT's Arrow router."""
    max_new_tokens: int = 12
    """Greedy tokens per prompt; the answer is the first line."""
    batch_size: int = 40
    """Prompts per generate call."""
    seed: int = 0
    """Seed of the prompt order and of the random baseline."""
    calibration: StudyConfig | None = field(default_factory=StudyConfig)
    """Calibrated routing (raw vs ratio vs zscore; balanced and skewed mixes); None skips it."""


@dataclass
class MethodResult:
    """One method's outcome on the evaluated prompts."""

    group: str
    correct: list[bool]
    routings: list[Routing] | None = None
    seconds: float = 0.0


def _k_label(k: int) -> str:
    return "all" if k == 0 else str(k)


def _summarise(result: MethodResult, tasks: list[str], own: list[int]) -> dict:
    per_task = {}
    for name in dict.fromkeys(tasks):
        hits = [c for c, t in zip(result.correct, tasks) if t == name]
        per_task[name] = sum(hits) / len(hits)
    out = {"group": result.group, "exact_match": sum(result.correct) / len(result.correct),
           "per_task": per_task, "seconds": round(result.seconds, 2)}
    if result.routings is not None:
        out["own_selected"] = sum(o in r.indices for o, r in zip(own, result.routings)) / len(own)
        out["mean_selected"] = sum(len(r.indices) for r in result.routings) / len(own)
    return out


def _mean_weights(routings: list[Routing], tasks: list[str], order: list[str], n: int) -> list[list[float]]:
    """Mean weight per (task, adapter): rows in `order`, columns in pool order."""
    rows = []
    for name in order:
        acc, count = [0.0] * n, 0
        for r, t in zip(routings, tasks):
            if t == name:
                count += 1
                for i, w in zip(r.indices, r.weights):
                    acc[i] += w
        rows.append([a / max(count, 1) for a in acc])
    return rows


def run_benchmark(model: nn.Module, tokenizer, cfg: EvalConfig = EvalConfig(),
                  adapters: Path = ADAPTER_DIR, log: Callable[[str], None] = print) -> dict:
    """Run every method on the held-out prompts; `model` is left untouched (copies are used)."""
    rows = suite_split("test", cfg.per_task, cfg.tasks, SplitConfig(), cfg.seed).to_list()
    tasks = [r["task"] for r in rows]
    engine_model = copy.deepcopy(model)
    pool = AdapterPool.load(adapters, engine_model, index_with_B=True)  # B: the entropy signal
    missing = sorted(set(tasks) - set(pool.names))
    if missing:
        raise ValueError(f"the pool in {adapters} has no adapter for tasks {missing}; train them with "
                         "`python -m jobs.demo.train --task " + ",".join(missing) + "`")
    engine = LoGoEngine(engine_model, tokenizer, pool, RoutingConfig(calibration_score="raw"),
                        GenerationConfig(max_new_tokens=cfg.max_new_tokens, stop_at_newline=True))
    seqs = [tokenizer(r["prompt"])["input_ids"] for r in rows]
    own = [pool.index(t) for t in tasks]
    n = len(pool)
    results: dict[str, MethodResult] = {}

    def answers(mix_rows: list[dict], mix_seqs: list[list[int]], routings: list[Routing]) -> list[bool]:
        texts: list[str] = []
        for start in range(0, len(mix_seqs), cfg.batch_size):
            batch = slice(start, start + cfg.batch_size)
            texts.extend(engine.generate(mix_seqs[batch], routings[batch])[0])
        return [check_row(r, extract_answer(t)) for r, t in zip(mix_rows, texts)]

    def generate(name: str, group: str, routings: list[Routing]) -> None:
        t0 = time.perf_counter()
        correct = answers(rows, seqs, routings)
        results[name] = MethodResult(group, correct, routings, time.perf_counter() - t0)
        log(f"{name:<40} exact match {sum(correct) / len(correct):.3f} ({time.perf_counter() - t0:.0f}s)")

    def generate_calibrated(name: str, mix_rows: list[dict], mix_seqs: list[list[int]],
                            routings: list[Routing]) -> float:
        if mix_rows is rows:  # the balanced mix: a row of the main table too
            label = f"calibrated {name.split(': ', 1)[1]}"
            generate(label, "calibrated", routings)
            return sum(results[label].correct) / len(rows)
        t0 = time.perf_counter()
        correct = answers(mix_rows, mix_seqs, routings)
        log(f"{name:<40} exact match {sum(correct) / len(correct):.3f} ({time.perf_counter() - t0:.0f}s)")
        return sum(correct) / len(correct)

    generate("base", "reference", [fixed_routing(engine, []) for _ in rows])
    generate("oracle (own adapter)", "reference", [fixed_routing(engine, [t]) for t in tasks])
    generate(f"uniform (all {n})", "baseline", [fixed_routing(engine, list(pool.names)) for _ in rows])
    for k in cfg.random_ks:
        generate(f"random k={k}", "baseline", random_routings(engine, len(rows), k, cfg.seed + k))

    settings = [(LAST, "norm", cfg.ks), (LAST, "entropy", cfg.ks),
                (ProbeSetting("mid", probe_layers=cfg.mid_layer), "norm", cfg.alt_ks),
                (ProbeSetting("module_input", probe_input="module_input"), "norm", cfg.alt_ks),
                (ProbeSetting("v_proj", probe_module="v_proj"), "norm", cfg.alt_ks)]
    routing_accuracy: dict[str, dict] = {}
    heatmaps: dict[str, list[list[float]]] = {}
    last_norm_scores = None
    for setting, signal, ks in settings:
        label = f"logo {signal} [{setting.label}]"
        scores = probe_scores(engine, seqs, setting, signal)  # (rows, N)
        if setting is LAST and signal == "norm":
            last_norm_scores = scores
        top1 = scores.argmax(dim=1).tolist()
        routing_accuracy[label] = {
            "overall": sum(a == o for a, o in zip(top1, own)) / len(own),
            "per_task": {t: sum(a == o for a, o, tt in zip(top1, own, tasks) if tt == t) / tasks.count(t)
                         for t in dict.fromkeys(tasks)},
            "top1_counts": {pool.names[i]: top1.count(i) for i in sorted(set(top1))}}
        log(f"{label:<40} routing accuracy {routing_accuracy[label]['overall']:.3f}")
        for k in ks:
            routings = select(engine, scores, setting, signal, k or n)
            generate(f"{label} k={_k_label(k)}", "logo", routings)
            if setting is LAST and signal == "norm" and k in (0, 3):
                heatmaps[f"LoGo norm, k={_k_label(k)}"] = _mean_weights(routings, tasks, list(cfg.tasks), n)
    assert last_norm_scores is not None
    for k in cfg.ks:
        routings = select(engine, last_norm_scores, LAST, "norm", k or n, exclude=own)
        generate(f"leave-one-out: logo norm [last] k={_k_label(k)}", "leave-one-out", routings)

    calibration = None
    if cfg.calibration is not None:
        skewed = skewed_rows(cfg.calibration, cfg.tasks)
        mixes = {"balanced": (rows, seqs), "skewed": (skewed, [tokenizer(r["prompt"])["input_ids"] for r in skewed])}
        calibration = run_study(engine, mixes, generate_calibrated, tokenizer, cfg.calibration, log)

    t0 = time.perf_counter()
    peer = arrow_model(copy.deepcopy(model), list(pool.paths), top_k=cfg.arrow_top_k)
    answers = arrow_generate(peer, tokenizer, [r["prompt"] for r in rows], cfg.max_new_tokens, cfg.batch_size)
    del peer
    name = f"PEFT Arrow top-{cfg.arrow_top_k} (peer)"
    results[name] = MethodResult("peer", [check_row(r, a) for r, a in zip(rows, answers)], None,
                                 time.perf_counter() - t0)
    log(f"{name:<40} exact match {sum(results[name].correct) / len(rows):.3f} ({results[name].seconds:.0f}s)")

    return {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, {platform.platform()}",
        "config": asdict(cfg), "adapters": list(pool.names), "n_prompts": len(rows),
        "methods": {name: _summarise(res, tasks, own) for name, res in results.items()},
        "routing_accuracy": routing_accuracy, "heatmaps": heatmaps, "heatmap_tasks": list(cfg.tasks),
        "calibration": calibration,
    }
