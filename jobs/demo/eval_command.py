"""`logo-batch eval`: the LoGo quality benchmark on the demo task suite and the shipped adapter pool.

    logo-batch eval --out runs/demo-eval        # about 11 minutes on 2 CPU cores

The methods and their settings are in `jobs/demo/evaluate.py` (`EvalConfig`); this module is the
command's wiring, kept free of torch so that `--help` is instant. Writes results.json,
results.md and heatmap.png to --out.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from jobs.demo import ADAPTER_DIR

PER_TASK = 10
"""Default of --per-task; equals `EvalConfig.per_task` (a test holds them together)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("runs/demo-eval"),
                        help="directory for results.json, results.md and heatmap.png")
    parser.add_argument("--adapters", type=Path, default=ADAPTER_DIR, help="adapter pool directory")
    parser.add_argument("--per-task", type=int, default=PER_TASK, help="test prompts per task")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")


def main(args: argparse.Namespace) -> int:
    import torch

    from actors.base import load_base
    from jobs.demo.evaluate import EvalConfig, run_benchmark
    from jobs.demo.model import ensure_demo_model
    from jobs.demo.report import markdown_report, plot_heatmap

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    model, tokenizer = load_base(ensure_demo_model(), torch.float32, torch.device("cpu"))
    results = run_benchmark(model, tokenizer, EvalConfig(per_task=args.per_task), args.adapters)
    results["total_seconds"] = round(time.perf_counter() - started, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "results.md").write_text(markdown_report(results))
    plot_heatmap(results, args.out / "heatmap.png")
    print(markdown_report(results))
    print(f"wrote {args.out}/results.json, results.md, heatmap.png in {results['total_seconds']:.0f}s")
    return 0
