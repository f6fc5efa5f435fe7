"""`logo-batch` command line: one sub-command per module under `jobs/`.

Each sub-command module exposes `add_arguments(parser)` and `main(args) -> int`; it is imported
only when its sub-command runs, so `logo-batch --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# sub-command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("jobs.run", "run a LoGo batch-inference job (Parquet in, Parquet out)"),
    "validate": ("jobs.validate", "check a job (config, input, model, adapters) and print its plan; starts no actors"),
    "calibrate": ("jobs.calibrate", "compute per-adapter routing-score statistics from unlabeled prompts"),
    "demo": ("jobs.demo.main", "set up SmolLM2-135M with the shipped adapter pool and run the main job"),
    "eval": ("jobs.demo.evaluate", "LoGo quality benchmark on the shipped task suite"),
    "bench": ("jobs.bench", "throughput benchmark against single-adapter and peer baselines"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="logo-batch", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        cmd.set_defaults(_module=module)
        if name in sys.argv[1:2]:  # only the chosen command's module is imported
            importlib.import_module(module).add_arguments(cmd)
    return parser


def main(argv: list[str] | None = None) -> int:
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    args = build_parser().parse_args()
    return int(importlib.import_module(args._module).main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
