"""Which calibration reference set transfers: the in-process default's routing on both shipped pools.

`LoGoPredictor(...)` with no calibration source routes with statistics of the shipped reference
prompts (`actors/reference_prompts.json`). This measures candidate sets for that file: routing top-1
of the default routing (zscore over q+v of every block, k = 1) on held-out prompts of the demo pool
(its 12 generated tasks) and of the BIG-bench pool (its 24 tasks), beside the job default (statistics
from a seeded sample of the evaluated prompts themselves). Candidates:

- `task-neutral`: the 200 hand-written task-neutral prompts shipped before
  (`jobs/demo/reference_candidates/task_neutral.json`);
- `bigbench N/k`: `jobs.demo.reference_set.build(N, k)`, N prompts in the suite's format, at most k
  per BIG-bench task family outside both pools and every BBH source;
- `bigbench 300/3 + task-neutral`: both, formats mixed.

Every prompt is probed once per pool, alone (`actors.calibration.prompt_scores`); each candidate's
statistics come from its prompts' rows (`stats_from_rows`), exactly as `compute_stats` computes them.

    python -m jobs.demo.reference_study --out jobs/demo/results_reference
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

from actors import AdapterPool, Router, RoutingConfig
from actors.calibration import prompt_scores, stats_from_rows
from jobs.demo import ADAPTER_DIR, BIGBENCH_ADAPTER_DIR, bigbench, reference_set
from jobs.demo.data import task_split
from jobs.demo.tasks import TASK_NAMES

TASK_NEUTRAL = Path(__file__).with_name("reference_candidates") / "task_neutral.json"


def candidates(archive: Path | None = None) -> dict[str, list[str]]:
    """The candidate sets by name."""
    neutral = json.loads(TASK_NEUTRAL.read_text())
    out = {f"bigbench {count}/{per_task}": reference_set.build(count, per_task, archive=archive)[0]
           for count, per_task in ((300, 3), (150, 1), (600, 6))}
    out["bigbench 300/3 + task-neutral"] = out["bigbench 300/3"] + neutral
    out["task-neutral"] = neutral
    return out


def eval_sets(per_task_demo: int, per_task_bb: int, archive: Path | None = None) -> dict[str, list[tuple[str, str]]]:
    """{pool: [(adapter name of the prompt's task, prompt)]}: held-out test prompts of each pool's tasks."""
    demo = [(t, r["prompt"]) for t in TASK_NAMES for r in task_split(t, "test")[:per_task_demo]]
    split = replace(bigbench.SplitConfig(), n_test=max(bigbench.SplitConfig().n_test, per_task_bb))
    data = bigbench.task_splits(bigbench.POOL_TASKS, split, archive)
    bb = [(bigbench.adapter_name(t), r["prompt"]) for t in bigbench.POOL_TASKS for r in data[t]["test"][:per_task_bb]]
    return {"demo": demo, "bigbench": bb}


def measure(model, tokenizer, adapters: Path, rows: list[tuple[str, str]], cands: dict[str, list[str]],
            sample: int, seed: int, log=print) -> dict:
    """Routing top-1 (overall and per task) of the default with each candidate's statistics, and the input's."""
    pool = AdapterPool.load(adapters, model)
    raw_router = Router(model, pool, replace(RoutingConfig(), calibration_score="raw"))
    cache: dict[str, torch.Tensor] = {}

    def raw(prompt: str) -> torch.Tensor:
        if prompt not in cache:
            with torch.inference_mode():
                cache[prompt] = prompt_scores(raw_router, tokenizer(prompt)["input_ids"])
        return cache[prompt]

    t0 = time.perf_counter()
    evaluated = torch.stack([raw(p) for _, p in rows])  # (rows, P, N)
    own = torch.tensor([pool.index(name) for name, _ in rows])
    order = random.Random(seed).sample(range(len(rows)), min(sample, len(rows)))
    sources = {"input sample (job default)": [rows[i][1] for i in order], **cands}
    out = {}
    for label, prompts in sources.items():
        stats = stats_from_rows(raw_router, [raw(p) for p in prompts], label)
        best = Router(model, pool, RoutingConfig(), stats).combine(evaluated).argmax(dim=1)
        hit = best == own
        per_task = {name: float(hit[[i for i, (n, _) in enumerate(rows) if n == name]].double().mean())
                    for name in dict.fromkeys(n for n, _ in rows)}
        out[label] = {"prompts": len(prompts), "top1": float(hit.double().mean()), "per_task": per_task}
        log(f"  {label:<34} {len(prompts):>4} prompts  routing top-1 {out[label]['top1']:.3f}")
    log(f"  ({len(cache)} prompts probed in {time.perf_counter() - t0:.0f}s)")
    return out


def choose(pools: dict, cands: dict[str, list[str]]) -> str:
    """The candidate with the best routing summed over both pools; on a tie, the fewest characters."""
    return max(cands, key=lambda c: (pools["demo"][c]["top1"] + pools["bigbench"][c]["top1"], -sum(map(len, cands[c]))))


def report(result: dict) -> str:
    lines = [f"Reference sets for the in-process default, measured {result['date']} on {result['machine']}.",
             f"Command: `{result['command']}`.", "",
             "Routing top-1 (%) of the default routing (zscore, q+v of every block, k = 1) on held-out prompts "
             f"of each shipped pool ({result['per_task']['demo']} per demo task, {result['per_task']['bigbench']} "
             "per BIG-bench task); `input sample`: statistics from a seeded sample of those prompts, as a job "
             "calibrates on its input.", "",
             "| statistics from | prompts | characters | demo pool | BIG-bench pool | mean |", "|---|---|---|---|---|---|"]
    for label in result["pools"]["demo"]:
        d, b = result["pools"]["demo"][label], result["pools"]["bigbench"][label]
        lines.append(f"| {label} | {d['prompts']} | {result['characters'].get(label, '')} | {100 * d['top1']:.0f} | "
                     f"{100 * b['top1']:.0f} | "
                     f"{50 * (d['top1'] + b['top1']):.0f} |")
    lines.append("")
    lines.append(f"Shipped: `{result['chosen']}` (the best mean over both pools; on a tie, the fewest characters: "
                 "every in-process predictor probes the set once, one prompt at a time, when it starts).")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/reference-study"))
    parser.add_argument("--per-task-demo", type=int, default=10)
    parser.add_argument("--per-task-bigbench", type=int, default=8)
    parser.add_argument("--sample", type=int, default=256, help="input-sample size of the job default")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--write", action="store_true", help="write the best candidate to actors/reference_prompts.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from actors.base import load_base
    from jobs.demo.model import ensure_demo_model

    bigbench.archive_path()
    model, tokenizer = load_base(ensure_demo_model(), torch.float32, torch.device("cpu"))
    cands = candidates()
    sets = eval_sets(args.per_task_demo, args.per_task_bigbench)
    pools = {}
    for name, adapters in (("demo", ADAPTER_DIR), ("bigbench", BIGBENCH_ADAPTER_DIR)):
        print(f"{name} pool ({adapters}), {len(sets[name])} prompts")
        pools[name] = measure(copy.deepcopy(model), tokenizer, adapters, sets[name], cands, args.sample, args.seed)
    chosen = choose(pools, cands)
    command = "python -m jobs.demo.reference_study " + " ".join(argv if argv is not None else __import__("sys").argv[1:])
    result = {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
              "command": command.strip(), "per_task": {"demo": args.per_task_demo, "bigbench": args.per_task_bigbench},
              "pools": pools, "characters": {c: sum(map(len, p)) for c, p in cands.items()}, "chosen": chosen}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "results.md").write_text(report(result))
    if args.write:
        reference_set.OUT.write_text(json.dumps(cands[chosen], indent=0, ensure_ascii=False) + "\n")
        print(f"wrote {len(cands[chosen])} prompts ({chosen}) to {reference_set.OUT}")
    print(report(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
