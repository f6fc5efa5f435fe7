"""Residency and selection-aware ordering on a pool of 1,000 adapters, and one long prompt among short ones.

    logo-batch bench --residency [--threads 1] [--out runs/bench-residency]

On the 8b-ratio shape (LoRA work per adapter relative to the base close to Llama-3.1-8B's with
rank-16 adapters on every linear module; random weights) with 1,000 synthetic PEFT-format adapters
read from disk by `LoGoPredictor`, the same way a job's actor reads them. Three measurements, each
one table, every figure from this one run:

1. residency: max_resident {8, 32, all} x ordering {input, selection} at k = 4 on clustered input
   (half the rows):
   adapter loads per 1,000 rows, rows/s, and the peak resident factors against the bound.
2. ordering at k = 20 (every adapter resident), on clustered input (prompts of 8 tasks, each task's
   prompts ending in the task's own instruction, shuffled; the pool holds 20 expert adapters per
   task, see `make_experts`) and on input that does not cluster (every prompt different): mean
   decode union per batch, rows/s, and the roofline for that union, 1 / (1 + |U| f) of the base
   model's rows/s, with f the per-adapter share of the base's weight traffic, and ours as a
   fraction of it; and the time to group one 256-row batch at k = 20 of 260.
3. 200 short prompts, with and without one 3,700-token prompt among them: seconds and their ratio,
   with length-bucketed generate calls (the default) and with one call per batch.

Generation-heavy regime: prompts of 16-48 tokens, NEW_TOKENS new tokens each, greedy, no early stop.
"""

from __future__ import annotations

import random
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from actors import LoGoPredictor
from actors.mixture import SlotMix
from jobs.benchmarks.config import RATIO_8B
from jobs.benchmarks.methods import fixed_length, hf_generate
from jobs.benchmarks.models import SPECIAL, random_model, synthetic_pool, word_tokenizer

SHAPE = RATIO_8B
POOL = 1000
TASKS = 8
EXPERTS = 20  # adapters per task that are its experts
ROWS = 256
BATCH = 16
NEW_TOKENS = 32
LONG_PROMPT = 3700


def _words(ids: list[int]) -> str:
    return " ".join(f"t{i}" for i in ids)


def task_words(seed: int) -> list[tuple[list[int], list[int]]]:
    """Per task: its 64-word vocabulary and its 4-word instruction (token ids)."""
    rng = random.Random(seed)
    words = list(range(len(SPECIAL), SHAPE.vocab))
    return [(rng.sample(words, 64), rng.sample(words, 4)) for _ in range(TASKS)]


def workloads(rows: int, seed: int) -> dict[str, list[str]]:
    """`clustered`: prompts of TASKS tasks, each a body of 12-40 words from the task's own 64-word
    vocabulary and the task's fixed 4-word instruction at the end, shuffled. `spread`: every prompt
    16-48 words drawn from the whole vocabulary."""
    rng = random.Random(seed + 1)
    words = list(range(len(SPECIAL), SHAPE.vocab))
    tasks = task_words(seed)
    clustered = []
    for i in range(rows):
        vocab, instruction = tasks[i % TASKS]
        clustered.append(_words([rng.choice(vocab) for _ in range(rng.randint(12, 44))] + instruction))
    rng.shuffle(clustered)
    spread = [_words([rng.choice(words) for _ in range(rng.randint(16, 48))]) for _ in range(rows)]
    return {"clustered": clustered, "spread": spread}


def write_assets(root: Path, pool: int, seed: int, log) -> tuple[Path, Path]:
    """A random model of SHAPE (positions for the long prompt) and POOL adapters, in HF/PEFT format."""
    model = random_model(SHAPE, seed, max_positions=LONG_PROMPT + 2 * NEW_TOKENS)
    model.save_pretrained(root / "model")
    word_tokenizer(SHAPE.vocab).save_pretrained(root / "model")
    started = time.perf_counter()
    for start in range(0, pool, 100):  # written in chunks: never the whole pool in memory
        for adapter in synthetic_pool(model, SHAPE, min(100, pool - start), seed + 1 + start, root / "pool"):
            adapter.path.rename(root / "pool" / f"a{start + int(adapter.name[1:]):04d}")
    make_experts(model, root / "pool", seed, log)
    log(f"  wrote {pool} adapters in {time.perf_counter() - started:.0f} s")
    return root / "model", root / "pool"


def make_experts(model, pool_dir: Path, seed: int, log) -> None:
    """Make the first EXPERTS adapters of each task the task's experts, as a pool of task adapters
    holds several for each task a job's prompts come from: the first row of their lora_A at every
    module points along the embedding of the task's last instruction word (the state the probe reads
    at the prompt's last token starts there), so they score high on the task's prompts. Their other
    factors stay random."""
    from safetensors.torch import load_file, save_file

    embeddings = model.get_input_embeddings().weight.detach()
    dirs = sorted(pool_dir.iterdir())
    for t, (_, instruction) in enumerate(task_words(seed + 7)):
        direction = embeddings[instruction[-1]] / embeddings[instruction[-1]].norm()
        for adapter in dirs[t * EXPERTS:(t + 1) * EXPERTS]:
            tensors = load_file(adapter / "adapter_model.safetensors")
            for key, value in tensors.items():
                if "lora_A" in key and value.shape[1] == direction.shape[0]:
                    value[0] = 3.0 * direction
            save_file(tensors, str(adapter / "adapter_model.safetensors"))
    log(f"  {EXPERTS} experts for each of {TASKS} tasks")


def _run(predictor: LoGoPredictor, prompts: list[str]) -> dict:
    before = predictor.batching()
    started = time.perf_counter()
    out = predictor({"prompt": np.array(prompts, dtype=object)})
    seconds = time.perf_counter() - started
    after = predictor.batching()
    delta = {k: after[k] - before[k] for k in before if not k.startswith("peak")}
    assert all(e is None for e in out["error"]), [e for e in out["error"] if e][:1]
    return {"rows": len(prompts), "seconds": seconds, "rows_per_s": len(prompts) / seconds,
            "decode_union": delta["decode_union_sum"] / max(1, delta["batches"]),
            "batch_union": delta["decode_union_sum"] / max(1, delta["decode_groups"]),
            "loads_per_1000": 1000 * delta["loads"] / len(prompts), "calls": delta["calls"],
            "grouping_share": delta["grouping_seconds"] / max(1e-9, delta["generate_seconds"]),
            "peak_bytes": after["peak_resident_bytes"], "peak_adapters": after["peak_resident"]}


def _base_rate(model_dir: Path, prompts: list[str]) -> float:
    """Rows/s of the base model alone over the same rows, batches of BATCH in input order."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = word_tokenizer(SHAPE.vocab)
    seqs = [tokenizer(p)["input_ids"] for p in prompts]
    started = time.perf_counter()
    hf_generate(model, seqs, BATCH, fixed_length(tokenizer, NEW_TOKENS), torch.device("cpu"))
    return len(prompts) / (time.perf_counter() - started)


def run(rows: int = ROWS, pool: int = POOL, long_rows: int = 200, seed: int = 0, log=print) -> dict:
    f = SHAPE.lora_work_ratio()
    out: dict = {"shape": SHAPE.name, "pool": pool, "rows": rows, "batch_size": BATCH, "new_tokens": NEW_TOKENS,
                 "f": f, "long_rows": long_rows,
                 "residency": [], "ordering": [], "long_prompt": []}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, pool_dir = write_assets(Path(tmp), pool, seed, log)
        data = workloads(rows, seed + 7)
        common = dict(max_new_tokens=NEW_TOKENS, batch_size=BATCH, device="cpu", dtype="float32",
                      calibration_prompts=data["clustered"][:64] + data["spread"][:64])

        def forced(predictor: LoGoPredictor) -> LoGoPredictor:  # no early stop: every row the same work
            predictor.engine.hf_config.min_new_tokens = NEW_TOKENS
            return predictor

        few = data["clustered"][: rows // 2]  # 16 rows per task at the default size
        for bound in (8, 32, None):
            started = time.perf_counter()
            predictor = forced(LoGoPredictor(model_dir, pool_dir, k=4, max_resident=bound, **common))
            log(f"  max_resident={bound}: pool read and indexed in {time.perf_counter() - started:.0f} s; "
                f"{predictor.pool.describe()}")
            for ordering in ("input", "selection"):
                predictor.ordering = ordering
                r = _run(predictor, few)
                limit = None if bound is None else bound * max(predictor.pool.sizes())
                out["residency"].append({"max_resident": bound or "all", "ordering": ordering, **r,
                                         "bound_bytes": limit, "index_bytes": predictor.pool.routing_index.nbytes,
                                         "full_bytes": predictor.pool.full_nbytes})
                log(f"    k=4 {ordering}: {r['rows_per_s']:.2f} rows/s, {r['loads_per_1000']:.0f} loads/1000 rows")
            if bound is not None:
                del predictor
        base = {name: _base_rate(model_dir, prompts) for name, prompts in data.items()}
        predictor.engine.set_routing(replace(predictor.engine.routing, k=20), predictor.calibration)
        for name, prompts in data.items():
            for ordering in ("input", "selection"):
                predictor.ordering = ordering
                r = _run(predictor, prompts)
                roofline = 1 / (1 + r["decode_union"] * f)
                out["ordering"].append({"input": name, "ordering": ordering, **r, "base_rows_per_s": base[name],
                                        "roofline": roofline,
                                        "of_roofline": r["rows_per_s"] / base[name] / roofline})
                log(f"    k=20 {name} {ordering}: union {r['decode_union']:.1f}, {r['rows_per_s']:.2f} rows/s")
        rng = random.Random(seed + 3)  # the slot pairs of one 256-row batch at k = 20 of 260 adapters
        selections = [rng.sample(range(260), 20) for _ in range(256)]
        started = time.perf_counter()
        mix = SlotMix(selections, [[0.05] * 20] * 256, 260, predictor.engine.device, predictor.pool.dtype)
        spread = next(x for x in out["ordering"] if x["input"] == "spread" and x["ordering"] == "selection")
        out["pairs_256"] = {"seconds": time.perf_counter() - started, "pairs": 256 * 20,
                            "generation_seconds": 256 / spread["rows_per_s"]}
        predictor.engine.set_routing(replace(predictor.engine.routing, k=4), predictor.calibration)
        short = data["spread"][:long_rows]
        rng = random.Random(seed + 9)
        middle = len(short) // 2
        long = short[:middle] + [_words([rng.randrange(len(SPECIAL), SHAPE.vocab) for _ in range(LONG_PROMPT)])]
        long += short[middle + 1:]
        predictor.ordering = "selection"
        for overhead in (predictor.engine.generation.generate_step_slots, float("inf")):
            predictor.engine.generation = replace(predictor.engine.generation, generate_step_slots=overhead)
            times = {name: _run(predictor, prompts)["seconds"] for name, prompts in (("short", short), ("long", long))}
            out["long_prompt"].append({"generate_step_slots": overhead, **times, "ratio": times["long"] / times["short"]})
            log(f"    {len(short)} rows, generate_step_slots={overhead}: {times['long'] / times['short']:.2f}x with the long prompt")
    return out


def tables(r: dict) -> str:
    mib = 2**20
    lines = [f"Residency at k = 4, clustered input, {r['rows'] // 2} rows, batches of {r['batch_size']}, "
             f"{r['new_tokens']} new tokens ({r['pool']} adapters of {r['shape']})", "",
             "| max_resident | ordering | loads / 1,000 rows | rows/s | vs all, same ordering | peak resident | bound |",
             "|---|---|---:|---:|---:|---:|---:|"]
    rate = {(x["max_resident"], x["ordering"]): x["rows_per_s"] for x in r["residency"]}
    for x in r["residency"]:
        bound = "-" if x["bound_bytes"] is None else f"{x['bound_bytes'] / mib:.0f} MiB"
        lines.append(f"| {x['max_resident']} | {x['ordering']} | {x['loads_per_1000']:.0f} | {x['rows_per_s']:.2f} | "
                     f"{x['rows_per_s'] / rate[('all', x['ordering'])]:.2f}x | {x['peak_bytes'] / mib:.0f} MiB "
                     f"({x['peak_adapters']}) | {bound} |")
    first = r["residency"][0]
    lines += ["", f"Routing index {first['index_bytes'] / mib:.0f} MiB (every actor); the whole pool's factors "
              f"{first['full_bytes'] / mib:.0f} MiB.", "",
              f"Ordering at k = 20, every adapter resident; f = {r['f']:.4f} per adapter", "",
              "| input | ordering | mean decode union per batch | rows/s | vs input order | base rows/s | "
              "roofline 1/(1+|U|f) | ours / (base x roofline) | setup / generation time |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    rate = {(x["input"], x["ordering"]): x["rows_per_s"] for x in r["ordering"]}
    for x in r["ordering"]:
        lines.append(f"| {x['input']} | {x['ordering']} | {x['decode_union']:.1f} | {x['rows_per_s']:.2f} | "
                     f"{x['rows_per_s'] / rate[(x['input'], 'input')]:.2f}x | {x['base_rows_per_s']:.2f} | "
                     f"{x['roofline']:.3f} | {x['of_roofline']:.2f} | {100 * x['grouping_share']:.1f}% |")
    g = r["pairs_256"]
    lines += ["", f"Forming the slot pairs of one 256-row batch at k = 20 of 260 adapters ({g['pairs']} pairs): "
              f"{g['seconds']:.3f} s, {100 * g['seconds'] / g['generation_seconds']:.1f}% of generating 256 such "
              f"rows ({g['generation_seconds']:.0f} s at the spread input's rate)."]
    lines += ["", f"{r['long_rows']} short prompts with one {LONG_PROMPT}-token prompt among them (k = 4)", "",
              "| generate_step_slots | short only | with the long prompt | ratio |", "|---|---:|---:|---:|"]
    for x in r["long_prompt"]:
        lines.append(f"| {x['generate_step_slots']:g} | {x['short']:.1f} s | {x['long']:.1f} s | {x['ratio']:.2f}x |")
    return "\n".join(lines)
