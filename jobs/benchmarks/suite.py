"""One benchmark run: for each shape, every method side by side per regime, then the pool-size sweep."""

from __future__ import annotations

import random
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from actors.base import resolve_device, resolve_dtype
from actors.calibration import compute_stats
from actors.engine import LoGoEngine
from actors.options import GenerationConfig, RoutingConfig
from actors.peft_reference import released_generate
from actors.pool import AdapterPool
from actors.router import Router
from jobs.benchmarks import methods as M
from jobs.benchmarks.config import BenchConfig, Regime, Shape, ShapeRun
from jobs.benchmarks.measure import Method, clock, run_round_robin
from jobs.benchmarks.models import base_model, clone, held_tensors, prompts, synthetic_pool, tensor_bytes

BASELINE = "peft-single"


@dataclass
class Setup:
    """Everything built once per shape and shared by its regimes."""

    shape: Shape
    source: str  # where the base weights came from
    tokenizer: PreTrainedTokenizerBase
    base: nn.Module  # the plain base model, method (1)
    peft: nn.Module  # a copy with every adapter loaded by PEFT, methods (2)-(4)
    arrow: nn.Module  # a copy with PEFT Arrow over every adapter, method (6)
    ours: nn.Module  # a copy whose adapted Linears are our mixture layers, method (5)
    pool: AdapterPool
    dirs: list[Path]  # the adapters in PEFT format, in pool (name) order
    device: torch.device
    base_bytes: int
    adapter_bytes: int  # one adapter, in the model's dtype


def build(part: ShapeRun, cfg: BenchConfig, root: Path, device: torch.device, dtype: torch.dtype,
          log: Callable[[str], None]) -> Setup:
    shape = part.shape
    model, tokenizer, source = base_model(shape, cfg.seed)
    model = model.to(dtype)
    adapters = synthetic_pool(model, shape, part.pool, cfg.seed + 1, root=root)
    dirs = [a.path for a in adapters]
    log(f"  {shape.name}: {source}; {part.pool} adapters written to {root}; loading them into PEFT and Arrow")
    peft = M.peft_pool_model(clone(model), dirs).to(device)
    arrow = M.arrow_pool_model(clone(model), dirs, cfg.arrow_top_k).to(device)
    ours = clone(model).to(device)
    pool = AdapterPool(adapters, ours, dtype, device)
    base = model.to(device)
    with torch.inference_mode():  # Arrow builds its prototypes on the first forward pass
        arrow(input_ids=torch.tensor([[5, 6]], device=device))
    one = sum(f.A.numel() + f.B.numel() for f in adapters[0].factors.values()) * dtype.itemsize
    return Setup(shape, source, tokenizer, base, peft, arrow, ours, pool, dirs, device, tensor_bytes(base), one)


def engine(s: Setup, k: int, new_tokens: int, pool: AdapterPool | None = None) -> LoGoEngine:
    """Our engine with the default routing (calibrated per pair over every block), statistics from a
    fixed sample of random prompts of the shape's vocabulary (the bench's prompts are random too)."""
    pool = pool or s.pool
    routing = RoutingConfig(k=k)
    rng = random.Random(11)
    sample = [[rng.randrange(4, s.shape.vocab) for _ in range(32)] for _ in range(16)]
    stats = compute_stats(Router(s.ours, pool, replace(routing, calibration_score="raw", min_confidence=None, uncertain_below=None)), sample, "bench sample")
    e = LoGoEngine(s.ours, s.tokenizer, pool, routing, GenerationConfig(max_new_tokens=new_tokens),
                   calibration=stats)
    e.hf_config = M.fixed_length(s.tokenizer, new_tokens)
    return e


def regime_methods(s: Setup, cfg: BenchConfig, regime: Regime, seqs: list[list[int]],
                   grouping_experiment: bool, lean: bool = False) -> list[Method]:
    """Every method of the side-by-side comparison on one workload (`lean`: fewer engine variants)."""
    n, bs, dev = len(seqs), cfg.batch_size, s.device
    gen = M.fixed_length(s.tokenizer, regime.new_tokens)
    held = s.base_bytes + len(s.dirs) * s.adapter_bytes  # base plus the whole pool
    first = s.dirs[0].name
    top = max(cfg.ks)
    variants = sorted({1, top}) if lean else list(cfg.ks)
    engines = {k: engine(s, k, regime.new_tokens) for k in variants}
    e1 = engines.get(1) or engine(s, 1, regime.new_tokens)
    M.activate(e1)
    k1 = [r.adapters[0] for b in M.batches(seqs, bs) for r in e1.route(b)]  # our k = 1 choices, for PEFT
    e_rel = engines.get(cfg.released_k) or engine(s, cfg.released_k, regime.new_tokens)
    by_length = sorted(seqs, key=len)
    m = min(cfg.released_prompts, n)
    released = [by_length[(2 * i + 1) * n // (2 * m)] for i in range(m)]  # spread over the lengths
    ours_bytes = s.base_bytes + s.pool.nbytes + tensor_bytes(*held_tensors(e1.router))

    def peft_single():
        s.peft.base_model.set_adapter(first)
        M.hf_generate(s.peft, seqs, bs, gen, dev)

    def peft_mixed():
        s.peft.base_model.set_adapter(first)
        M.hf_generate(s.peft, seqs, bs, gen, dev, adapter_names=k1)

    def released_run():
        M.activate(e_rel)
        for seq in released:
            (routing,) = e_rel.route([seq])
            released_generate(s.peft, seq, routing, gen, dev)
        s.peft.base_model.set_adapter(first)

    def probe_only():
        M.activate(e1)
        for b in M.batches(seqs, bs):
            e1.route(b)

    out = [
        M.method("base", "(1) base model alone, batched", lambda: M.hf_generate(s.base, seqs, bs, gen, dev),
                 n, regime.new_tokens, s.base_bytes),
        M.method(BASELINE, "(2) PEFT, one adapter for every row: the baseline", peft_single, n,
                 regime.new_tokens, s.base_bytes + s.adapter_bytes),
        M.method("peft-mixed", "(3) PEFT mixed batch, adapter_names = our k=1 choice per row", peft_mixed, n,
                 regime.new_tokens, held),
        M.method(f"released-k{cfg.released_k}", "(4) released code: PEFT, k adapters rescaled, batch 1, "
                 "with our probe", released_run, len(released), regime.new_tokens, held),
        M.method("arrow", f"(6) PEFT Arrow, top_k={min(cfg.arrow_top_k, len(s.dirs))}",
                 lambda: M.hf_generate(s.arrow, seqs, bs, gen, dev), n, regime.new_tokens, tensor_bytes(s.arrow)),
        M.method("probe", "LoGo probe alone (blocks 0..T-1, adapters off)", probe_only, n, 0, ours_bytes),
    ]
    for k, e in engines.items():
        out.append(M.method(f"ours-k{k}", f"(5) our engine, k={k}",
                            lambda e=e: M.ours_run(e, seqs, bs)[1], n, regime.new_tokens, ours_bytes))
    if grouping_experiment:
        k, e = top, engines[top]
        for kind, cluster in (("clustered", cfg.cluster_rows), ("scattered", 1)):
            rts = M.synthetic_routings(n, len(s.pool), k, cluster, cfg.seed + 7, s.pool.names)
            out.append(M.method(f"given-{kind}-k{k}",
                                f"(5) given {kind} selections ({cluster} rows share one), generation only",
                                lambda e=e, rts=rts: M.ours_run(e, seqs, bs, rts)[1], n, regime.new_tokens,
                                ours_bytes))
    return out


def summarise(results: list[dict], regime: Regime, cfg: BenchConfig) -> dict:
    """Ratios to the baseline and the throughput aims, from one regime's results."""
    by = {r["name"]: r for r in results}
    base = by[BASELINE]["prompts_per_s"]
    for r in results:
        r["x_baseline"] = r["prompts_per_s"] / base if r["prompts"] and r["new_tokens"] else None
    per_prompt = {name: r["median_seconds"] / r["prompts"] for name, r in by.items()}
    floor_s = per_prompt["probe"] + per_prompt[BASELINE]
    top = max(cfg.ks)
    ours = per_prompt[f"ours-k{top}"]
    out = {"floor_prompts_per_s": 1.0 / floor_s, "floor_x_baseline": per_prompt[BASELINE] / floor_s,
           f"ours_k{top}_x_baseline": per_prompt[BASELINE] / ours,
           f"ours_k{top}_x_floor": floor_s / ours,
           f"ours_k{top}_x_released": per_prompt[f"released-k{cfg.released_k}"] / ours,
           "ours_x_baseline": {k: per_prompt[BASELINE] / per_prompt[f"ours-k{k}"]
                               for k in cfg.ks if f"ours-k{k}" in per_prompt}}
    clustered, scattered = f"given-clustered-k{top}", f"given-scattered-k{top}"
    if clustered in per_prompt:
        out["clustered_x_scattered"] = per_prompt[scattered] / per_prompt[clustered]
    return out


def sweep(s: Setup, cfg: BenchConfig, regime: Regime, log: Callable[[str], None]) -> list[dict]:
    """Our engine for every pool size and k on the labelling workload: time and memory."""
    seqs = prompts(regime, cfg.prompts, s.shape.vocab, cfg.seed + 3)
    adapters = synthetic_pool(s.base, s.shape, max(cfg.sweep_pools), cfg.seed + 5)
    rows = []
    for n in cfg.sweep_pools:
        pool = AdapterPool(adapters[:n], s.ours, s.pool.dtype, s.device)
        methods = []
        for k in cfg.ks:
            e = engine(s, k, regime.new_tokens, pool)
            held = s.base_bytes + pool.nbytes + tensor_bytes(*held_tensors(e.router))
            methods.append(M.method(f"N{n}-k{k}", "", lambda e=e: M.ours_run(e, seqs, cfg.batch_size)[1],
                                    len(seqs), regime.new_tokens, held))
        log(f"  sweep N={n}")
        run_round_robin(methods, cfg.sweep_repeats, s.device, log)
        for k, m in zip(cfg.ks, methods):
            rows.append({"pool": n, "k": k, "pool_mib": pool.nbytes / 2**20, **m.result()})
        del pool
    return rows


def run(cfg: BenchConfig, log: Callable[[str], None] = print) -> dict:
    """The whole benchmark; returns the results as a JSON-ready dict."""
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    torch.set_num_threads(cfg.threads)
    report = {"device": str(device), "dtype": str(dtype).removeprefix("torch."), "threads": cfg.threads,
              "clock": "process CPU time" if clock(device) is time.process_time else "wall time",
              "shapes": [], "sweep": None}
    for part in cfg.shapes:
        shape, regimes = part.shape, part.regimes
        with tempfile.TemporaryDirectory(prefix="logo-bench-") as tmp:
            s = build(part, cfg, Path(tmp), device, dtype, log)
            entry = {"shape": shape.name, "weights": s.source, "config": shape.__dict__, "pool": part.pool,
                     "lora_work_ratio": shape.lora_work_ratio(), "regimes": []}
            for regime in regimes:
                seqs = prompts(regime, part.prompts or cfg.prompts, shape.vocab, cfg.seed + 2)
                methods = regime_methods(s, cfg, regime, seqs, grouping_experiment=shape.name == cfg.sweep_shape,
                                         lean=part.lean)
                log(f"  {shape.name} / {regime.name}: {len(methods)} methods x {cfg.repeats} rounds")
                run_round_robin(methods, cfg.repeats, device, log)
                results = [m.result() for m in methods]
                entry["regimes"].append({"regime": regime.__dict__, "methods": results,
                                         "summary": summarise(results, regime, cfg)})
            if shape.name == cfg.sweep_shape and cfg.sweep_pools:
                labelling = next((r for r in regimes if r.name == "labelling"), regimes[-1])
                report["sweep"] = {"shape": shape.name, "regime": labelling.__dict__,
                                   "rows": sweep(s, cfg, labelling, log)}
            report["shapes"].append(entry)
            del s
    return report
