"""The GPU check `logo-batch bench --gpu` runs first: what only a CUDA device can show, in one pass.

On a random-weight model of `shape` (default 8b-width: Llama-3.1-8B's widths on four blocks, every
linear module adapted at rank 16) and a pool of 64 adapters, in bfloat16:

1. equivalence: the slot mixture against `mixture_reference` (k = 20, every adapted module of the
   first block, computed in float32 from the same inputs) and, for the whole model at k = 1,
   against PEFT with that one adapter, each as the error over the adapters' own effect;
2. decode-step time of the base model, PEFT with one adapter and our engine at k = 1, 4, 20 (64
   rows, each its own selection of k), from the same prefilled KV cache, as ratios to the base;
3. a decode step of ours (k = 20) captured in a CUDA graph with a static KV cache and replayed: its
   logits against the eager step, and its time against the eager step's;
4. peak device memory against the budget the pool planned (`max_resident: auto`: free memory less
   the headroom and the KV cache of the batch), with the budget's arithmetic.

The same code runs on the CPU (float32, a tiny shape, no graph) for the test suite.
"""

from __future__ import annotations

import random
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from actors.mixture import mixture_add_, mixture_reference
from actors.options import GenerationConfig, RoutingConfig
from actors.budget import kv_cache_nbytes
from actors.pool import AdapterPool
from actors.residency import format_bytes
from actors.router import Routing
from jobs.benchmarks.config import WIDTH_8B, Shape
from jobs.benchmarks.models import random_model, synthetic_pool, word_tokenizer, write_peft


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _routings(rows: int, pool: int, k: int, names: tuple[str, ...], seed: int) -> list[Routing]:
    rng = random.Random(seed)
    out = []
    for _ in range(rows):
        idx = tuple(rng.sample(range(pool), k))
        w = [rng.random() + 0.1 for _ in idx]
        out.append(Routing(indices=idx, adapters=tuple(names[i] for i in idx), weights=tuple(v / sum(w) for v in w)))
    return out


def _prefill(model, ids: torch.Tensor):
    """The prompt pass with a fresh KV cache: (cache, next token ids (B, 1))."""
    out = model(input_ids=ids, use_cache=True)
    return out.past_key_values, out.logits[:, -1:].argmax(-1)


def _step_seconds(model, ids: torch.Tensor, steps: int, device: torch.device) -> float:
    """Median seconds of one decode step over `steps` steps after a fresh prefill."""
    cache, nxt = _prefill(model, ids)
    times = []
    for step in range(steps + 2):  # the first two warm up (allocator, kernels' first launch)
        _sync(device)
        t0 = time.perf_counter()
        out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
        _sync(device)
        if step >= 2:
            times.append(time.perf_counter() - t0)
        cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    return sorted(times)[len(times) // 2]


def _relative(ours: torch.Tensor, theirs: torch.Tensor, base: torch.Tensor) -> float:
    """max |ours - theirs| over max |theirs - base|: the error as a share of the adapters' effect."""
    return float((ours.float() - theirs.float()).abs().max() / (theirs.float() - base.float()).abs().max())


def _graph_step(engine, ids: torch.Tensor, routings: list[Routing], device: torch.device, steps: int) -> dict:
    """A decode step of ours captured in a CUDA graph over a static KV cache, replayed."""
    from transformers import StaticCache

    model, length = engine.model, ids.shape[1]
    cache = StaticCache(config=model.config, max_cache_len=length + steps + 4)
    with engine.mixing(routings, widths=(1, length)):
        out = model(input_ids=ids, past_key_values=cache, use_cache=True,
                    cache_position=torch.arange(length, device=device))
        static_ids = out.logits[:, -1:].argmax(-1)
        position = torch.tensor([length], device=device)
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):  # warm-up off the capture, as torch.cuda.graph asks
            for _ in range(2):
                eager = model(input_ids=static_ids, past_key_values=cache, use_cache=True,
                              cache_position=position).logits
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = model(input_ids=static_ids, past_key_values=cache, use_cache=True,
                             cache_position=position).logits
        graph.replay()
        _sync(device)
        match = float((captured.float() - eager.float()).abs().max() / eager.float().abs().max())
        times_graph, times_eager = [], []
        for _ in range(steps):
            t0 = time.perf_counter()
            graph.replay()
            _sync(device)
            times_graph.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            model(input_ids=static_ids, past_key_values=cache, use_cache=True, cache_position=position)
            _sync(device)
            times_eager.append(time.perf_counter() - t0)
    graph_s, eager_s = sorted(times_graph)[steps // 2], sorted(times_eager)[steps // 2]
    return {"captured": True, "relative_difference": match, "graph_ms": graph_s * 1e3, "eager_ms": eager_s * 1e3,
            "eager_over_graph": eager_s / graph_s}


def run(device: str = "cuda", dtype: str = "bfloat16", shape: Shape = WIDTH_8B, pool_size: int = 64, rows: int = 64,
        prompt_tokens: int = 64, ks: tuple[int, ...] = (1, 4, 20), steps: int = 16, headroom: float = 0.1,
        log: Callable[[str], None] = print) -> dict:
    """The four checks above; returns their figures (see `table`)."""
    from peft import PeftModel

    from actors.engine import LoGoEngine
    from jobs.benchmarks.models import clone

    device, torch_dtype = torch.device(device), getattr(torch, dtype)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    log(f"gpu check: {shape.name} on {device} in {dtype}, {pool_size} adapters, {rows} rows")
    cpu_model = random_model(shape, seed=0)
    adapters = synthetic_pool(cpu_model, shape, pool_size, seed=1)
    peft_dir = Path(tempfile.mkdtemp(prefix="logo-gpu-check-")) / adapters[0].name
    write_peft(adapters[0], peft_dir, shape, alpha=2.0 * shape.rank)
    peft = PeftModel.from_pretrained(clone(cpu_model), peft_dir).to(device, torch_dtype).eval()
    model = cpu_model.to(device, torch_dtype)
    tokenizer = word_tokenizer(shape.vocab)
    per_block = kv_cache_nbytes(model.config, rows, prompt_tokens + steps + 8, torch_dtype.itemsize)
    pool = AdapterPool(adapters, model, torch_dtype, device, max_resident="auto", memory_headroom=headroom,
                       kv_cache={device: per_block * shape.layers})
    del adapters
    engine = LoGoEngine(model, tokenizer, pool, RoutingConfig(k=max(ks), calibration_score="raw"),
                        GenerationConfig(max_new_tokens=steps))
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(4, shape.vocab, (rows, prompt_tokens), generator=g).to(device)
    result: dict = {"shape": shape.name, "device": str(device), "dtype": dtype, "pool": pool_size, "rows": rows,
                    "prompt_tokens": prompt_tokens, "slots": pool.slots, "budget": pool.budget_lines()}

    with torch.inference_mode():
        # 1. equivalence
        routings = _routings(rows, pool_size, min(20, pool_size), pool.names, seed=3)
        x = torch.randn(rows, 3, shape.hidden, generator=g).to(device, torch_dtype)
        worst = 0.0
        weights = torch.zeros(rows, pool_size)
        for b, r in enumerate(routings):
            weights[b, list(r.indices)] = torch.tensor(r.weights)
        with engine.mixing(routings, widths=(1, 3)) as mix:
            slots = pool.acquire_slots({i for r in routings for i in r.indices})  # resident already: their slots
            for m in [m for m in pool.modules if ".layers.0." in m]:
                A_t, B_t = engine.state.storage[m]
                factors = [(A_t[slots[i]].T.float(), B_t[slots[i]].T.float(), 1.0) if i in slots else None
                           for i in range(pool_size)]
                reference = mixture_reference(x.float(), factors, weights.to(device))
                ours = torch.zeros(rows, 3, reference.shape[-1], device=device, dtype=torch_dtype)
                mixture_add_(ours, x, A_t, B_t, mix)
                worst = max(worst, float((ours.float() - reference).abs().max() / reference.abs().max()))
        result["mixture_vs_reference"] = worst
        one = [Routing(indices=(0,), adapters=(pool.names[0],), weights=(1.0,))] * rows
        with engine.mixing(one, widths=(prompt_tokens,)):
            ours = model(input_ids=ids).logits
        base = model(input_ids=ids).logits
        theirs = peft(input_ids=ids).logits
        result["k1_vs_peft"] = _relative(ours, theirs, base)
        del ours, base, theirs
        log(f"  equivalence: mixture vs reference {worst:.2e} (k=20, relative), k=1 vs PEFT "
            f"{result['k1_vs_peft']:.3f} of the adapter's effect")

        # 2. decode-step time
        times = {"base": _step_seconds(model, ids, steps, device), "peft single": _step_seconds(peft, ids, steps, device)}
        for k in ks:
            routed = _routings(rows, pool_size, k, pool.names, seed=10 + k)
            with engine.mixing(routed, widths=(1, prompt_tokens)):
                times[f"ours k={k}"] = _step_seconds(model, ids, steps, device)
        result["step_ms"] = {name: s * 1e3 for name, s in times.items()}
        result["step_over_base"] = {name: s / times["base"] for name, s in times.items()}
        result["step_over_peft"] = {name: s / times["peft single"] for name, s in times.items()}
        log("  decode step: " + ", ".join(f"{n} {s * 1e3:.2f} ms" for n, s in times.items()))

        # 3. CUDA graph
        if device.type == "cuda":
            try:
                result["graph"] = _graph_step(engine, ids, _routings(rows, pool_size, min(20, pool_size), pool.names, 4),
                                              device, steps)
            except Exception as err:  # a capture that fails is the finding: report it
                result["graph"] = {"captured": False, "error": f"{type(err).__name__}: {err}"[:500]}
        else:
            result["graph"] = {"captured": False, "error": "no CUDA device"}
        log(f"  cuda graph: {result['graph']}")

    # 4. memory
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        result["peak_bytes"] = torch.cuda.max_memory_allocated(device)
        result["budget_bytes"] = int(total * (1 - headroom))
        log(f"  peak device memory {format_bytes(result['peak_bytes'])} of a budget of "
            f"{format_bytes(result['budget_bytes'])}; " + "; ".join(pool.budget_lines()))
    return result


def table(result: dict) -> str:
    """The check's figures as Markdown."""
    lines = [f"GPU check: {result['shape']} on {result['device']} in {result['dtype']}, {result['pool']} adapters, "
             f"{result['rows']} rows of {result['prompt_tokens']} prompt tokens", "",
             f"- mixture vs reference (k = 20, error / effect): {result['mixture_vs_reference']:.2e}",
             f"- k = 1 vs PEFT single adapter (error / the adapter's effect on the logits): {result['k1_vs_peft']:.3f}",
             "", "| decode step | ms | / base | / PEFT single |", "|---|---:|---:|---:|"]
    for name, ms in result["step_ms"].items():
        lines.append(f"| {name} | {ms:.2f} | {result['step_over_base'][name]:.2f}x | "
                     f"{result['step_over_peft'][name]:.2f}x |")
    graph = result["graph"]
    lines.append("")
    if graph.get("captured"):
        lines.append(f"- CUDA graph of a k = 20 decode step: captured; replay vs eager logits {graph['relative_difference']:.2e}; "
                     f"eager {graph['eager_ms']:.2f} ms, graph {graph['graph_ms']:.2f} ms ({graph['eager_over_graph']:.2f}x)")
    else:
        lines.append(f"- CUDA graph: not captured ({graph.get('error')})")
    if "peak_bytes" in result:
        lines.append(f"- peak device memory {format_bytes(result['peak_bytes'])} of a budget of "
                     f"{format_bytes(result['budget_bytes'])}; slots {result['slots']}: " + "; ".join(result["budget"]))
    return "\n".join(lines)
