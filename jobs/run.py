"""`logo-batch run`: run a LoGo batch-inference job (Parquet in, Parquet out), or resume it.

    logo-batch run --config job.yaml [--set routing.k=5 ...]
    logo-batch run --model M --adapters A --input I --output O [--k K] [--signal S]
                   [--calibration input|reference|FILE|none] [--paper]
                   [--max-new-tokens N] [--actors N] [--batch-size B] [--overwrite] [--retry-errors]

Flags override the file's values; a flag left out keeps the file's value, else the key's default
(shown with each flag; every key and its default: pipeline/README.md). `--address` runs the
driver here against a running Ray cluster (`logo-batch submit` runs it on the cluster).
Exit status: 0 when the output is committed (now or before), 2 for a configuration, input or
output problem (nothing was computed), 3 when more rows failed than `run.max_error_fraction`
allows (not committed; rows kept for `--retry-errors`), 1 when an actor refused the model or
adapters, or for other failures.
"""

from __future__ import annotations

import argparse
import sys

# flag -> (dotted configuration key, type, help, the key's default as shown by --help); the shown
# defaults are those of `pipeline/config.py` (a test holds them equal)
FLAGS: dict[str, tuple[str, type, str, str]] = {
    "model": ("model.path", str, "base model directory or s3:// prefix", "the job file's; required"),
    "adapters": ("adapters.path", str, "adapter pool directory or s3:// prefix", "the job file's; required"),
    "input": ("input.uri", str, "Parquet file, directory or s3:// prefix", "the job file's; required"),
    "output": ("output.uri", str, "output directory or s3:// prefix", "the job file's; required"),
    "prompt_column": ("input.prompt_column", str, "column holding the prompts", "prompt"),
    "id_column": ("input.id_column", str, "column holding unique row ids", "none: rows are numbered"),
    "k": ("routing.k", int, "adapters mixed per prompt", "1"),
    "signal": ("routing.signal", str, "routing score: norm or entropy", "norm"),
    "calibration": ("routing.calibration", str, "calibration statistics: input (a sample of this job's prompts), "
                    "reference (the shipped set), a statistics file, or none", "input"),
    "calibration_score": ("routing.calibration_score", str, "zscore, ratio, or raw (the paper's score)", "zscore"),
    "max_new_tokens": ("generation.max_new_tokens", int, "new tokens per prompt", "64"),
    "actors": ("resources.actors", int, "number of LoGo actors", "1"),
    "batch_size": ("resources.batch_size", int, "rows per actor call", "16"),
    "gpus_per_actor": ("resources.gpus_per_actor", float, "GPUs per actor",
                       "1 when the Ray cluster has GPUs, else 0"),
    "endpoint": ("storage.endpoint", str, "S3 endpoint URL", "AWS_ENDPOINT_URL, else AWS"),
    "address": ("resources.ray_address", str, "Ray cluster to run on, e.g. auto or ray://head:10001",
                "RAY_ADDRESS, else a new local Ray of this machine"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="job configuration file (YAML; every key: pipeline/README.md) "
                        "(default: none: the flags and --set alone)")
    for flag, (key, kind, help_text, shown) in FLAGS.items():
        action = parser.add_argument(f"--{flag.replace('_', '-')}", dest=flag, type=kind, help=f"{help_text} ({key})")
        action.shown_default = shown  # the key's default, not the flag's None ("keep the file's value")
    parser.add_argument("--paper", action="store_true",
                        help="route exactly as the LoGo paper: raw norm score at q_proj of the last block, k=20, "
                             "no calibration (flags and --set given with it still apply)")
    parser.add_argument("--overwrite", action="store_true", help="delete an earlier run at the output first")
    parser.add_argument("--retry-errors", action="store_true",
                        help="compute the error rows of the run at the output again (committed or not), "
                             "keeping every other row")
    parser.add_argument("--set", dest="set_items", action="append", default=[], metavar="KEY=VALUE",
                        help="set any configuration key, e.g. --set generation.stop_at_newline=true")


def job_config(args: argparse.Namespace):
    """The `JobConfig` of the job file and flags (shared with `logo-batch validate`)."""
    from pipeline import load_config
    from pipeline.config import PAPER_ROUTING
    from pipeline.config_io import parse_set

    overrides = {f"routing.{key}": value for key, value in PAPER_ROUTING.items()} if args.paper else {}
    overrides.update({key: getattr(args, flag) for flag, (key, _, _, _) in FLAGS.items()
                      if getattr(args, flag, None) is not None})
    if str(overrides.get("routing.calibration", "")).lower() in ("none", "null"):
        overrides["routing.calibration"] = None
    overrides.update(parse_set(args.set_items))
    if args.overwrite:
        overrides["output.overwrite"] = True
    return load_config(args.config, overrides)


def run_to_exit(command: str, build, retry_errors: bool = False, replace: bool = False) -> int:
    """Build the job (`build()` returns a `JobConfig`, or an exit status to stop with), run it and
    print its report; a refusal or failure is printed and mapped to the exit status in this
    module's docstring. Shared by `run` and `nightly`."""
    import logging

    from jobs.cli import local_ray_defaults
    from pipeline import ConfigError, InputError, OutputError, StageError, run_job
    from pipeline.errors import TooManyErrors

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        config = build()
        if isinstance(config, int):
            return config
        local_ray_defaults(config.resources.ray_address)
        report = run_job(config, retry_errors=retry_errors, replace=replace)
    except TooManyErrors as err:
        print(f"logo-batch {command}: {err}", file=sys.stderr)
        return 3
    except (ConfigError, InputError, OutputError) as err:
        print(f"logo-batch {command}: {err}", file=sys.stderr)
        return 2
    except StageError as err:
        print(f"logo-batch {command}: {err}", file=sys.stderr)
        return 1
    except Exception as err:
        return storage_exit(command, err)
    print(report.format())
    return 0


CREDENTIALS_FIX = ("set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, or run where an instance or "
                   "pod role provides them) in the environment of this command, and storage.endpoint (or "
                   "AWS_ENDPOINT_URL) for an S3 server other than AWS")


def storage_exit(command: str, err: Exception) -> int:
    """Exit 2 with `storage_problem`'s line for an object-storage failure a user fixes; anything
    else is raised again (called from an `except` block, so the traceback is the original's)."""
    message = storage_problem(err)
    if message is None:
        raise err
    print(f"logo-batch {command}: {message}", file=sys.stderr)
    return 2


def storage_problem(err: BaseException) -> str | None:
    """One line for an object-storage failure a user fixes (missing or refused credentials, an
    endpoint that does not answer), with the fix; None for anything else."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        name, text = type(err).__name__, " ".join(str(err).split())
        if name in ("NoCredentialsError", "PartialCredentialsError"):
            return f"no S3 credentials were found ({text}); {CREDENTIALS_FIX}"
        if name == "ClientError" and any(code in text for code in ("InvalidAccessKeyId", "SignatureDoesNotMatch",
                                                                    "AccessDenied", "403")):
            return f"the S3 server refused the credentials ({text}); {CREDENTIALS_FIX}"
        if name == "EndpointConnectionError":
            return f"no S3 server answers ({text}); check storage.endpoint (or AWS_ENDPOINT_URL) and that it runs"
        if isinstance(err, OSError) and "AWS Error" in text and ("ACCESS_DENIED" in text or "credentials" in text):
            return f"the S3 server refused the request ({text}); {CREDENTIALS_FIX}"
        err = err.__cause__ or err.__context__
    return None


def main(args: argparse.Namespace) -> int:
    return run_to_exit("run", lambda: job_config(args), retry_errors=args.retry_errors)
