"""`logo-batch eval`: the LoGo quality benchmark on the demo task suite and the shipped adapter pool.

    logo-batch eval --out runs/demo-eval        # about 11 minutes on 2 CPU cores
    logo-batch eval --suite bigbench --out runs/bigbench-eval   # BIG-bench pool and held-out BBH tasks

`--suite bigbench` reads BIG-bench tasks from the `bigbench==1.0.0` sdist (fetched once into the
cache with pip, see `jobs/demo/bigbench.py`) and routes over `jobs/demo/bigbench_adapters`; its
methods are in `jobs/demo/evaluate_bigbench.py`.

The methods and their settings are in `jobs/demo/evaluate.py` (`EvalConfig`); this module is the
command's wiring, kept free of torch so that `--help` is instant. Writes results.json,
results.md and heatmap.png to --out.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from jobs.demo import ADAPTER_DIR, BIGBENCH_ADAPTER_DIR

PER_TASK = 10
"""Default of --per-task; equals `EvalConfig.per_task` (a test holds them together)."""
BIGBENCH_PER_TASK = 8
"""Default of --per-task for the BIG-bench suite; equals `BigbenchEvalConfig.per_task`."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--suite", choices=("demo", "bigbench"), default="demo",
                        help="`demo`: the generated tasks; `bigbench`: BIG-bench tasks and held-out BBH tasks")
    parser.add_argument("--out", type=Path, default=None,
                        help="directory for results.json, results.md and heatmap.png (default: runs/<suite>-eval)")
    parser.add_argument("--adapters", type=Path, default=None,
                        help=f"adapter pool directory (default: {ADAPTER_DIR}, or {BIGBENCH_ADAPTER_DIR} for bigbench)")
    parser.add_argument("--per-task", type=int, default=None,
                        help=f"test prompts per task (default: {PER_TASK}, or {BIGBENCH_PER_TASK} for bigbench)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--routing-only", action="store_true",
                        help="bigbench: measure routing top-1 only, no generation (minutes instead of an hour)")


def main(args: argparse.Namespace) -> int:
    import torch

    from actors.base import load_base
    from jobs.demo.evaluate import EvalConfig, run_benchmark
    from jobs.demo.model import ensure_demo_model
    from jobs.demo.report import markdown_report, plot_heatmap

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    out = args.out or Path(f"runs/{args.suite}-eval")
    if args.suite == "bigbench":
        from jobs.demo import bigbench
        from jobs.demo.evaluate_bigbench import BigbenchEvalConfig, run_bigbench
        from jobs.demo.report import bigbench_report

        bigbench.archive_path()  # fetched (or the offline error) before the model loads
        model, tokenizer = load_base(ensure_demo_model(), torch.float32, torch.device("cpu"))
        cfg = BigbenchEvalConfig(per_task=args.per_task or BIGBENCH_PER_TASK, routing_only=args.routing_only)
        results = run_bigbench(model, tokenizer, cfg, args.adapters or BIGBENCH_ADAPTER_DIR)
        command = (f"logo-batch eval --suite bigbench --per-task {cfg.per_task} --threads {args.threads} --out {out}"
                   + (" --routing-only" if cfg.routing_only else ""))
        render = lambda r: bigbench_report(r, command)  # noqa: E731
    else:
        model, tokenizer = load_base(ensure_demo_model(), torch.float32, torch.device("cpu"))
        results = run_benchmark(model, tokenizer, EvalConfig(per_task=args.per_task or PER_TASK),
                                args.adapters or ADAPTER_DIR)
        render = markdown_report
    results["total_seconds"] = round(time.perf_counter() - started, 1)
    args.out = out
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "results.md").write_text(render(results))
    if results["heatmaps"]:
        plot_heatmap(results, args.out / "heatmap.png")
    print(render(results))
    print(f"wrote {args.out}/results.json, results.md, heatmap.png in {results['total_seconds']:.0f}s")
    return 0
