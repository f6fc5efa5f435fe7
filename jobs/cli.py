"""`logo-batch` command line: one sub-command per module under `jobs/`.

Each sub-command module exposes `add_arguments(parser)` and `main(args) -> int`; it is imported
only when its sub-command runs, and imports its heavy dependencies (torch, Ray, transformers)
inside `main`, so `--help` answers in well under a second for every sub-command.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# sub-command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("jobs.run", "run a LoGo batch-inference job (Parquet in, Parquet out)"),
    "validate": ("jobs.validate", "check a job (config, input, model, adapters) and print its plan; starts no actors"),
    "submit": ("jobs.submit", "submit a `run` job to a running Ray cluster through the Ray Jobs API"),
    "nightly": ("jobs.nightly", "run one night of a dated labelling job (input and output URIs with {date})"),
    "report": ("jobs.report", "write (or rewrite) the report and plots of a committed run"),
    "calibrate": ("jobs.calibrate", "compute per-adapter routing-score statistics from unlabeled prompts"),
    "demo": ("jobs.demo.main", "set up SmolLM2-135M with the shipped adapter pool and run the main job"),
    "eval": ("jobs.demo.eval_command", "LoGo quality benchmark on the shipped task suite"),
    "bench": ("jobs.bench", "throughput benchmark against single-adapter and peer baselines"),
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows every option's default, and keeps the sub-command's docstring layout. An option whose
    parser default is None (left out: someone else decides) shows what it then is: its action's
    `shown_default`, or the `default: ...` its help ends with."""

    def _get_help_string(self, action):
        shown = getattr(action, "shown_default", None)
        if shown is not None:
            return f"{action.help} (default: {shown})"
        if action.required:
            return f"{action.help} (default: none, required)"
        if action.default is None and "(default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def local_ray_defaults(address: str | None) -> None:
    """A job that starts its own local Ray (no address, no RAY_ADDRESS) runs it without token
    authentication: a single-user Ray on this machine, and no warning about it on every run."""
    if not (address or os.environ.get("RAY_ADDRESS")):
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def add_command(sub, name: str, module: str, help_text: str, *, load: bool) -> argparse.ArgumentParser:
    """Register one sub-command; `load` imports its module to declare its options."""
    cmd = sub.add_parser(name, help=help_text, formatter_class=HelpFormatter)
    cmd.set_defaults(_module=module)
    if load:
        mod = importlib.import_module(module)
        cmd.description = mod.__doc__ or help_text
        mod.add_arguments(cmd)
    return cmd


def build_parser(argv: list[str] | None = None, *, load_all: bool = False) -> argparse.ArgumentParser:
    """The parser; only the chosen command's module is imported (all of them with `load_all`)."""
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="logo-batch", description=__doc__.splitlines()[0],
                                     formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        add_command(sub, name, module, help_text, load=load_all or name in argv[:1])
    return parser


INTERRUPTED = 130
"""Exit status after Ctrl-C (128 + SIGINT), as shells report it."""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv).parse_args(argv)
    try:
        return int(importlib.import_module(args._module).main(args) or 0)
    except KeyboardInterrupt:
        print(f"\nlogo-batch {args.command}: interrupted; every data file written so far is kept: rerun the same "
              "command to resume", file=sys.stderr)
        return INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
