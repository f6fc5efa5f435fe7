"""Per-row confidence and the base-model fallback, measured: what sets `routing.min_confidence`.

On held-out prompts of a pool's tasks it routes with the default routing (zscore over q+v of every
block, k = 1) twice: over the whole pool (every prompt has its own adapter) and leave-one-out
(each prompt's own adapter removed: the prompt has no adapter of its own, the paper's setting).
Statistics come from a seeded sample of the evaluated prompts (`input`, as a job calibrates) or
from the shipped reference set (`reference`, the in-process default). For each row it records the
candidate confidences (the top calibrated score per pair, and its margin over the second) and
whether the base model, the oracle (own adapter) and the routed adapter answer it right; a
threshold t then gives every row below it the base model's answer, so exact match at every t is
computed from three generations per row, not one per threshold.

    python -m jobs.demo.confidence_study --out runs/confidence   # the demo pool
    python -m jobs.demo.confidence_study --suite bigbench --adapters PATH --out runs/confidence-bb
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import platform
import random
import time
from dataclasses import replace
from pathlib import Path

import torch

from actors import AdapterPool, GenerationConfig, LoGoEngine, Router, Routing, RoutingConfig
from actors.calibration import compute_stats, reference_prompts
from actors.router import confidence_of

THRESHOLDS = (None, -1.0, -0.5, 0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0)
"""Values of min_confidence and uncertain_below swept (None: off)."""
UNCERTAIN_KS = (3, 5)
"""Values of uncertain_k swept: rows below the threshold mix this many adapters instead of 1."""


def _routing(pool, i: int) -> Routing:
    return Routing(indices=(i,), adapters=(pool.names[i],), weights=(1.0,))


def _base() -> Routing:
    return Routing(indices=(), adapters=(), weights=())


def study(model, tokenizer, rows: list[dict], check, adapters: Path, sources: tuple[str, ...] = ("input", "reference"),
          sample: int = 256, seed: int = 0, max_new_tokens: int = 12, batch_size: int = 40,
          references: dict[str, list[str]] | None = None, partial: Path | None = None, log=print) -> dict:
    """Per row and calibration source: confidences and correctness; sweeps of THRESHOLDS.

    A source is `input` (a seeded sample of the rows), `reference` (the shipped set) or a name in
    `references` (other candidate reference sets)."""
    engine_model = copy.deepcopy(model)
    pool = AdapterPool.load(adapters, engine_model)
    engine = LoGoEngine(engine_model, tokenizer, pool, RoutingConfig(calibration_score="raw"),
                        GenerationConfig(max_new_tokens=max_new_tokens, stop_at_newline=True))
    config = RoutingConfig(k=len(pool), uncertain_below=None)  # top-1 and the full order; widening swept below
    router = Router(engine_model, pool, replace(config, calibration_score="raw"))
    seqs = [tokenizer(r["prompt"])["input_ids"] for r in rows]
    own = [pool.index(r["task"]) if r["task"] in pool.names else None for r in rows]
    raw = torch.cat([router.raw_scores(router.probe(*engine.pad(seqs[i:i + 16]))) for i in range(0, len(seqs), 16)])
    cache: dict[tuple, bool] = {}

    def correct(routings: list[Routing]) -> list[bool]:
        todo = [i for i, r in enumerate(routings) if (i, r.indices) not in cache]
        for start in range(0, len(todo), batch_size):
            part = todo[start:start + batch_size]
            texts = engine.generate([seqs[i] for i in part], [routings[i] for i in part])[0]
            for i, text in zip(part, texts):
                cache[(i, routings[i].indices)] = check(rows[i], text.strip())
        return [cache[(i, r.indices)] for i, r in enumerate(routings)]

    t0 = time.perf_counter()
    base = correct([_base() for _ in rows])
    oracle = correct([_routing(pool, o) if o is not None else _base() for o in own])
    log(f"base {sum(base) / len(base):.3f}, oracle {sum(oracle) / len(oracle):.3f} ({time.perf_counter() - t0:.0f}s)")
    references = {"reference": reference_prompts(), **(references or {})}
    out = {"rows": len(rows), "adapters": list(pool.names), "base": base, "oracle": oracle, "tasks":
           [r["task"] for r in rows], "sources": {}}
    for source in sources:
        if source == "input":
            picked = random.Random(seed).sample(seqs, min(sample, len(seqs)))
        else:
            picked = [tokenizer(p)["input_ids"] for p in references[source]]
        stats = compute_stats(router, picked, source, seed)
        calibrated = Router(engine_model, pool, config, stats)
        scores = calibrated.combine(raw)  # (rows, N)
        entry = {}
        for setting in ("pool", "leave-one-out"):
            s = scores.clone()
            if setting == "leave-one-out":
                keep = [i for i, o in enumerate(own) if o is not None]
                s[torch.tensor(keep), torch.tensor([own[i] for i in keep])] = float("-inf")
            top = calibrated.select(s)
            conf = confidence_of(s, calibrated.rankable, len(calibrated.pairs))  # (rows, 2): top, margin
            routed = correct([_routing(pool, r.indices[0]) for r in top])
            wide = {str(w): correct(Router(engine_model, pool, RoutingConfig(k=w, uncertain_below=None), stats).select(s))
                    for w in UNCERTAIN_KS if w < len(pool)}  # top w, as routing.uncertain_k=w mixes them
            entry[setting] = {"top1": [r.indices[0] for r in top], "routed": routed, "wide": wide,
                              "routing": sum(r.indices[0] == o for r, o in zip(top, own)) / len(own),
                              "em": sum(routed) / len(routed),
                              "confidence": [round(v, 5) for v in conf[:, 0].tolist()],
                              "margin": [round(v, 5) for v in conf[:, 1].tolist()]}
            log(f"{source} {setting}: routing {sum(a == b for a, b in zip(entry[setting]['top1'], own)) / len(own):.3f} "
                f"EM {sum(routed) / len(routed):.3f} ({time.perf_counter() - t0:.0f}s)")
        entry["sweep"] = sweep(entry, base, oracle, own)
        out["sources"][source] = entry
        if partial is not None:  # what is measured so far survives an interrupted run
            Path(partial).write_text(json.dumps(out) + "\n")
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def em_with_threshold(setting: dict, base: list[bool], key: str, t: float | None, rows: list[int]) -> tuple[float, float]:
    """(exact match, share of rows falling back) over `rows` when those with `key` below t take the
    answer in `base` (the base model's, or a wider mixture's)."""
    fell = [t is not None and setting[key][i] < t for i in rows]
    picks = [base[i] if f else setting["routed"][i] for i, f in zip(rows, fell)]
    return sum(picks) / len(picks), sum(fell) / len(fell)


def sweep(entry: dict, base: list[bool], oracle: list[bool], own: list) -> dict:
    """For both candidate confidences and every threshold: EM on the pool's tasks (`pool`), the same
    prompts with their own adapter removed (`loo`) and prompts of tasks with no adapter (`held_out`),
    with the share of rows sent to the base model."""
    inside = [i for i, o in enumerate(own) if o is not None]
    outside = [i for i, o in enumerate(own) if o is None]
    groups = {"pool": ("pool", inside), "loo": ("leave-one-out", inside), "held_out": ("pool", outside)}
    out = {}
    for key in ("confidence", "margin"):
        for t in THRESHOLDS:
            line = {}
            for name, (setting, rows) in groups.items():
                if rows:
                    em, fell = em_with_threshold(entry[setting], base, key, t, rows)
                    line[f"{name}_em"], line[f"{name}_fallback"] = round(em, 4), round(fell, 4)
            out[f"{key} {t}"] = line
    for w in entry["pool"].get("wide", {}):  # per-row k: rows below t mix w adapters instead of 1
        for t in THRESHOLDS[1:]:
            line = {}
            for name, (setting, rows) in groups.items():
                if rows:
                    em, fell = em_with_threshold(entry[setting], entry[setting]["wide"][w], "confidence", t, rows)
                    line[f"{name}_em"], line[f"{name}_widened"] = round(em, 4), round(fell, 4)
            out[f"uncertain_k={w} {t}"] = line
    for name, rows in (("pool", inside), ("held_out", outside)):
        if rows:
            out[f"base_em_{name}"] = round(sum(base[i] for i in rows) / len(rows), 4)
            out[f"oracle_em_{name}"] = round(sum(oracle[i] for i in rows) / len(rows), 4)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/confidence"))
    parser.add_argument("--suite", choices=("demo", "bigbench"), default="demo")
    parser.add_argument("--adapters", type=Path, default=None)
    parser.add_argument("--per-task", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sources", nargs="+", default=["input", "reference"],
                        help="input, reference, or NAME=FILE.json (a candidate reference set)")
    args = parser.parse_args(argv)
    from actors.base import load_base
    from jobs.demo.model import ensure_demo_model

    torch.set_num_threads(args.threads)
    model, tokenizer = load_base(ensure_demo_model(), torch.float32, torch.device("cpu"))
    if args.suite == "demo":
        from jobs.demo import ADAPTER_DIR
        from jobs.demo.data import check_row, suite_split
        from jobs.demo.tasks import extract_answer

        rows = suite_split("test", args.per_task).to_list()
        adapters = args.adapters or ADAPTER_DIR

        def check(row, text):
            return check_row(row, extract_answer(text))
    else:
        from jobs.demo import bigbench

        splits = bigbench.task_splits((*bigbench.POOL_TASKS, *bigbench.HELD_OUT_TASKS))
        rows = [{**r, "task": bigbench.adapter_name(t)} for t, s in splits.items() for r in s["test"][:args.per_task]]
        adapters = args.adapters or Path(__file__).with_name("bigbench_adapters")

        def check(row, text):
            return bigbench.check_row(row, text.split("\n", 1)[0])
    files = dict(s.split("=", 1) for s in args.sources if "=" in s)
    names = tuple(s.split("=", 1)[0] for s in args.sources)
    references = {name: json.loads(Path(f).read_text()) for name, f in files.items()}
    args.out.mkdir(parents=True, exist_ok=True)
    result = study(model, tokenizer, rows, check, adapters, names, references=references,
                   partial=args.out / "confidence.partial.json")
    result["date"] = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    result["machine"] = f"{platform.machine()}, {torch.get_num_threads()} torch threads, {platform.platform()}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "confidence.json").write_text(json.dumps(result) + "\n")
    for source, entry in result["sources"].items():
        print(f"== {source}: routing {entry['pool']['routing']:.3f}, EM {entry['pool']['em']:.3f}; "
              + ", ".join(f"{k} {v}" for k, v in entry["sweep"].items() if not isinstance(v, dict)))
        for name, v in entry["sweep"].items():
            if isinstance(v, dict):
                print(f"{name:<18} " + "  ".join(f"{k} {x:.3f}" for k, x in v.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
