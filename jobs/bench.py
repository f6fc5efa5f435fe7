"""`logo-batch bench`: throughput of LoGo against single-adapter and peer baselines, in one run.

    logo-batch bench [--full | --gpu] [--out runs/bench] [--threads 1] [--device auto]

`--gpu` first runs the GPU check (`jobs.benchmarks.gpu_check`: bfloat16 equivalence to the
reference and PEFT, decode-step time of base, PEFT and ours at k = 1, 4, 20 on 64 rows, a decode
step in a CUDA graph, peak memory against the budget), then the throughput suite in bfloat16.

Measures prompts/s, generated tokens/s and memory of the base model, PEFT with one adapter, PEFT
mixed batches, the released code's batch-of-one procedure, PEFT Arrow and our engine (k in 1, 4, 20,
and k = 20 with given clustered and scattered selections) on the same prompts, pool and batch size,
then sweeps the pool size.
Writes a table to stdout, `bench.json` and `sweep.png` to --out.

    logo-batch bench --pipeline [--rows 100000,1000000] [--s3-endpoint URL] [--out runs/bench-pipeline]

The pipeline benchmark instead: generated inputs through the whole job (driver memory, time to
the first output file, rows/s against the in-process predictor, rows decoded) and `validate` up to
10M rows (planning time, driver memory); see `jobs.benchmarks.pipeline`.

    logo-batch bench --residency [--threads 1] [--out runs/bench-residency]

    logo-batch bench --startup [--adapters 1000] [--out runs/bench-startup]

Start-up of 1 and 2 actors on one node over a pool on disk: bytes read, host peak and seconds to
the first routed row, the full read against the index-only read; see `jobs.benchmarks.startup`.

Bounded residency and selection-aware ordering on 1,000 adapters, and one long prompt among short
ones; see `jobs.benchmarks.residency`.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", dest="preset", action="store_const", const="quick",
                      help="the default: minutes on two CPU cores")
    size.add_argument("--full", dest="preset", action="store_const", const="full",
                      help="more prompts, larger batches, SmolLM2 in both regimes, more rounds")
    size.add_argument("--gpu", dest="preset", action="store_const", const="gpu",
                      help="a lent CUDA device, bfloat16: the 8b-ratio and 8b-width shapes, 64 rows a batch")
    size.add_argument("--smoke", dest="preset", action="store_const", const="smoke",
                      help="a tiny model and workload (seconds; for tests)")
    size.add_argument("--pipeline", dest="preset", action="store_const", const="pipeline",
                      help="the pipeline benchmark: the whole job on generated inputs, and validate at 10M rows")
    parser.set_defaults(preset="quick")
    parser.add_argument("--out", type=Path, default=Path("runs/bench"), help="folder for bench.json and sweep.png")
    parser.add_argument("--repeats", type=int, help="timed rounds per method (median counts) (default: the preset's)")
    parser.add_argument("--threads", type=int,
                        help="torch CPU threads (default: the preset's, 1: steadier on a shared machine)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"),
                        help="device of the measured models (default: the preset's, auto)")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16"),
                        help="weight dtype of the measured models (default: the preset's, auto)")
    parser.add_argument("--no-sweep", action="store_true", help="skip the pool-size sweep")
    parser.add_argument("--residency", action="store_true",
                        help="only residency {8, 32, all} and selection-aware ordering on 1,000 adapters, and one "
                             "3,700-token prompt among 200 short ones")
    parser.add_argument("--startup", action="store_true",
                        help="only the pool's start-up: bytes read, host peak and seconds to the first routed row "
                             "per actor (1 and 2 actors), the full read against the index-only read")
    parser.add_argument("--adapters", type=int, default=1000, help="--startup: adapters in the pool on disk")
    parser.add_argument("--probe", action="store_true",
                        help="only the routing probe's cost per prompt, paper vs default, at N = 8, 256, 1000")
    pipe = parser.add_argument_group("--pipeline options")
    pipe.add_argument("--rows", default="100000", help="input sizes run through the pipeline")
    pipe.add_argument("--row-groups", default="1000000,10000", help="Parquet row-group sizes")
    pipe.add_argument("--validate-rows", default="100000,10000000", help="input sizes planned by validate")
    pipe.add_argument("--batch-size", type=int, default=256, help="rows per actor call")
    pipe.add_argument("--s3-endpoint", help="also run every case with input and output on this S3 endpoint (default: none, local disk only)")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"
    return f"{cpu}, {os.cpu_count()} CPUs{gpu}, torch {torch.__version__}"


def write_results(path: Path, title: str, body: str) -> Path:
    """The figures of one run as a results file (the format of `jobs/benchmarks/results/*.md`):
    title, date, machine and the command that produced them, then the tables as printed."""
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    command = " ".join(["logo-batch", *sys.argv[1:]]) if sys.argv[1:2] == ["bench"] else "logo-batch bench"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# {title}\n\n- date: {date}\n- machine: {machine()}\n- command: `{command}`\n\n{body.rstrip()}\n")
    return path


def pipeline_main(args: argparse.Namespace) -> int:
    from jobs.benchmarks.pipeline import PipelineBench, run, table

    def sizes(text: str) -> tuple[int, ...]:
        return tuple(int(v) for v in text.split(",") if v.strip())

    cfg = PipelineBench(rows=sizes(args.rows), row_groups=sizes(args.row_groups),
                        validate_rows=sizes(args.validate_rows), batch_size=args.batch_size,
                        s3_endpoint=args.s3_endpoint)
    out = args.out if args.out != Path("runs/bench") else Path("runs/bench-pipeline")
    started = datetime.datetime.now(datetime.timezone.utc)
    report = run(cfg, out, lambda msg: print(msg, file=sys.stderr, flush=True))
    report["date"] = started.strftime("%Y-%m-%d %H:%M UTC")
    report["machine"] = machine()
    (out / "bench-pipeline.json").write_text(json.dumps(report, indent=1))
    print(table(report))
    write_results(out / "results.md", "Pipeline benchmark", table(report))
    print(f"wrote {out / 'bench-pipeline.json'} and {out / 'results.md'}")
    return 0


def gpu_check(args: argparse.Namespace) -> int:
    """`--gpu` first: `jobs.benchmarks.gpu_check` (equivalence, decode-step time, CUDA graph, memory)."""
    import torch

    from jobs.benchmarks import gpu_check as check

    if not torch.cuda.is_available():
        print("logo-batch bench --gpu: no CUDA device is visible; run it on a machine with a GPU", file=sys.stderr)
        return 2
    result = check.run(log=lambda msg: print(msg, file=sys.stderr, flush=True))
    result["machine"] = machine()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu-check.json").write_text(json.dumps(result, indent=1))
    print(check.table(result))
    print(f"wrote {args.out / 'gpu-check.json'}")
    return 0


def main(args: argparse.Namespace) -> int:
    import logging

    if args.preset == "pipeline":
        return pipeline_main(args)

    from transformers.utils import logging as hf_logging

    from jobs.benchmarks.config import preset
    from jobs.benchmarks.report import plot_sweep, table, write_json
    from jobs.benchmarks.suite import run

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    logging.getLogger("peft").setLevel(logging.ERROR)
    if args.residency:
        import torch

        from jobs.benchmarks import residency

        torch.set_num_threads(args.threads or 1)
        result = residency.run(log=lambda msg: print(msg, file=sys.stderr, flush=True))
        result["machine"], result["threads"] = machine(), torch.get_num_threads()
        out = args.out if args.out != Path("runs/bench") else Path("runs/bench-residency")
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench-residency.json").write_text(json.dumps(result, indent=1))
        print(f"residency and ordering ({machine()}, {torch.get_num_threads()} thread(s))")
        print(residency.tables(result))
        write_results(out / "results.md", "Residency and ordering benchmark", residency.tables(result))
        return 0
    if args.startup:
        from jobs.benchmarks import startup

        if args.adapters < 1:
            print("logo-batch bench: --adapters must be >= 1", file=sys.stderr)
            return 2
        out = args.out if args.out != Path("runs/bench") else Path("runs/bench-startup")
        result = startup.run(args.adapters, log=lambda msg: print(msg, file=sys.stderr, flush=True))
        result["machine"] = machine()
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench-startup.json").write_text(json.dumps(result, indent=1))
        print(startup.table(result))
        write_results(Path(__file__).parent / "benchmarks" / "results" / "startup.md", "Start-up benchmark",
                      startup.table(result))
        return 0
    if args.probe:
        import torch

        from jobs.benchmarks import probe

        torch.set_num_threads(args.threads or 1)
        rows = probe.run(log=lambda msg: print(msg, file=sys.stderr, flush=True))
        print(f"routing probe per prompt ({machine()}, {torch.get_num_threads()} thread(s), CPU time)")
        print(probe.table(rows))
        return 0
    if args.preset == "gpu" and (code := gpu_check(args)) != 0:
        return code
    cfg = preset(args.preset)
    changes = {name: getattr(args, name) for name in ("repeats", "threads", "device", "dtype")
               if getattr(args, name, None) is not None}
    if args.no_sweep:
        changes["sweep_pools"] = ()
    if changes.get("repeats", 1) < 1 or changes.get("threads", 1) < 1:
        print("logo-batch bench: --repeats and --threads must be >= 1", file=sys.stderr)
        return 2
    cfg = dataclasses.replace(cfg, **changes)
    started = datetime.datetime.now(datetime.timezone.utc)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    report = run(cfg, log)
    report["date"] = started.strftime("%Y-%m-%d %H:%M UTC")
    report["machine"] = machine()
    report["preset"] = args.preset
    report["wall_seconds"] = (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds()
    write_json(report, args.out / "bench.json")
    plotted = plot_sweep(report, args.out / "sweep.png")
    print(table(report))
    write_results(args.out / "results.md", f"Throughput benchmark ({args.preset or 'quick'})", table(report))
    print(f"wrote {args.out / 'bench.json'}, {args.out / 'results.md'}"
          + (f" and {args.out / 'sweep.png'}" if plotted else "") + f" in {report['wall_seconds']:.0f} s")
    return 0
