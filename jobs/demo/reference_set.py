"""The shipped calibration reference set (`actors/reference_prompts.json`), rebuilt from BIG-bench.

`LoGoPredictor(...)` with no calibration source computes its statistics from these prompts, so they
should look like the prompts real jobs send. They are drawn from BIG-bench JSON tasks outside both
shipped pools and outside every BIG-Bench Hard source (the held-out setting must not calibrate on
its own tasks): a task is left out when its family (the folder above any subtask) is that of a
task of the BIG-bench pool, of a BBH source, or is named like a demo task. Prompts are in the
suite's format (`jobs.demo.bigbench.build_prompt`: prefix, input, options, `\\nAnswer:`), up to
`per_task` from each remaining task family (its subtasks interleaved; round-robin over the
families in a seeded order, so no family dominates), `count` in all. The shipped file is the
default, one prompt per family (108); `jobs.demo.reference_study` measured it against larger sets
and the old task-neutral prompts. Deterministic: the same archive, seed and counts give the same file.

    python -m jobs.demo.reference_set                       # writes actors/reference_prompts.json
    python -m jobs.demo.reference_set --out /tmp/ref.json --count 300 --per-task 3 --seed 0   # a candidate
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from jobs.demo import bigbench
from jobs.demo.tasks import TASK_NAMES

OUT = Path(__file__).resolve().parents[2] / "actors" / "reference_prompts.json"


def family(task: str) -> str:
    """`<task>` of `<task>[/<subtask>]`."""
    return task.split("/", 1)[0]


def excluded_families() -> set[str]:
    """Task families no reference prompt may come from: both pools' tasks and every BBH source."""
    return {family(t) for t in (*bigbench.POOL_TASKS, *bigbench.HELD_OUT_TASKS, *bigbench.BBH_TASKS, *TASK_NAMES)}


def build(count: int = 150, per_task: int = 1, seed: int = 0, archive: Path | None = None,
          max_chars: int | None = None) -> tuple[list[str], dict]:
    """`count` prompts (and a record of where they came from), drawn as the module says; with
    `max_chars`, only prompts of at most that many characters."""
    excluded = excluded_families()
    tasks = bigbench.read_tasks(None, archive)
    cfg = bigbench.SplitConfig(seed=seed)
    by_family: dict[str, list[str]] = {}  # family -> its prompts, its subtasks interleaved
    for name, parts in tasks.items():
        if family(name) in excluded:
            continue
        rows = bigbench.task_rows(name, parts, cfg)
        if rows:
            kept = [r["prompt"] for r in rows if max_chars is None or len(r["prompt"]) <= max_chars][:per_task]
            if kept:
                by_family.setdefault(family(name), []).append(kept)
    pools = {f: [p for rank in range(per_task) for sub in subs if rank < len(sub) for p in [sub[rank]]][:per_task]
             for f, subs in by_family.items()}
    order = sorted(pools)
    random.Random(seed).shuffle(order)
    prompts: list[str] = []
    for rank in range(per_task):
        for name in order:
            if len(prompts) < count and rank < len(pools[name]):
                prompts.append(pools[name][rank])
    record = {"count": len(prompts), "per_task": per_task, "seed": seed, "families": len(order), "max_chars": max_chars,
              "families_excluded": sorted(excluded), "source": bigbench.PACKAGE}
    return prompts, record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--count", type=int, default=150)
    parser.add_argument("--per-task", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    prompts, record = build(args.count, args.per_task, args.seed)
    args.out.write_text(json.dumps(prompts, indent=0, ensure_ascii=False) + "\n")
    print(json.dumps({k: v for k, v in record.items() if k != "families_excluded"}))
    print(f"wrote {len(prompts)} prompts to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
