"""`logo-batch validate`: check a job without running it, and print the plan.

    logo-batch validate --config job.yaml [same flags as run]

Checks the configuration, the input (files, columns, types, row counts, ids), prompt lengths in
a sample (blank and over-long prompts counted), the model and every adapter, and the output
(committed, another job's, a partial run to resume); prints the read plan. Writes nothing and
starts no actors. Exit status: 0 when nothing is wrong, 2 with every problem listed.
"""

from __future__ import annotations

import argparse
import sys

from jobs.run import add_arguments as add_run_arguments
from jobs.run import job_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_run_arguments(parser)
    parser.add_argument("--sample", type=int, default=1024, help="prompts sampled for the length statistics")


def main(args: argparse.Namespace) -> int:
    from pipeline import ConfigError
    from pipeline.validate import validate_job

    try:
        config = job_config(args)
    except ConfigError as err:
        print(f"logo-batch validate: 1 problem(s):\n  - {err}", file=sys.stderr)
        return 2
    from jobs.run import storage_exit

    try:
        result = validate_job(config, sample_rows=max(1, args.sample))
    except Exception as err:
        return storage_exit("validate", err)
    print(result.format())
    return 2 if result.problems else 0
