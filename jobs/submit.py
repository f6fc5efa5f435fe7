"""`logo-batch submit`: run a job on a running Ray cluster through the Ray Jobs API.

    logo-batch submit --address http://head:8265 --config job.yaml            # prints the job id
    logo-batch submit --address http://head:8265 --config job.yaml --wait     # follows the logs
    logo-batch submit --config nightly.yaml --command nightly --set resources.actors=8

The job's runtime environment carries this project (the `actors`, `pipeline` and `jobs` packages,
as `py_modules`) and the job file (alone in the job's working directory), so the cluster needs
only the project's dependencies (the image of `infra/`), not this checkout. The driver runs on
the cluster as `python -m jobs.cli run --config <job file> [--set ...]` and joins the cluster's
Ray. With `--wait` the command prints the job's logs as they come and exits with the job's
outcome: 0 when it succeeded, 1 when it failed or was stopped. Without, it exits 0 once the job
is accepted. S3 credentials are the cluster's (its nodes' environment); `--env NAME` copies a
variable of this shell into the job's environment instead.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

PACKAGES = ("actors", "pipeline", "jobs")
"""The project's packages, shipped with every job."""
JOB_FILE = "job.yaml"
"""The job file's name in the job's working directory."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", default=os.environ.get("RAY_ADDRESS") or "http://127.0.0.1:8265",
                        help="the cluster's Ray Jobs address (its dashboard, http://HOST:8265); "
                             "the default comes from RAY_ADDRESS when it is set")
    parser.add_argument("--config", required=True, help="job file (YAML) for the job, as for `logo-batch run`")
    parser.add_argument("--command", choices=("run", "nightly"), default="run",
                        help="the logo-batch command the driver runs with the job file")
    parser.add_argument("--set", dest="set_items", action="append", default=[], metavar="KEY=VALUE",
                        help="set any configuration key on the driver's command line, e.g. --set routing.k=5")
    parser.add_argument("--arg", dest="extra", action="append", default=[], metavar="ARG",
                        help="one more argument for the driver's command, e.g. --arg=--overwrite or "
                             "--arg=--date=2026-11-28 (repeatable)")
    parser.add_argument("--env", dest="env_names", action="append", default=[], metavar="NAME",
                        help="copy this environment variable into the job's environment (repeatable)")
    parser.add_argument("--submission-id", default=None,
                        help="the job's id; a second submission with an id is refused (default: Ray chooses one)")
    parser.add_argument("--wait", action="store_true", help="follow the job's logs and exit with its outcome")


def entrypoint(command: str, set_items: list[str], extra: list[str]) -> str:
    """The driver's command line on the cluster."""
    import shlex

    words = ["python", "-m", "jobs.cli", command, "--config", JOB_FILE]
    for item in set_items:
        words += ["--set", item]
    return shlex.join(words + list(extra))


def runtime_env(job_file: Path, workdir: Path, env_names: list[str]) -> dict:
    """Packages as py_modules, the job file alone in the working directory, chosen variables."""
    import shutil

    root = Path(__file__).resolve().parents[1]
    shutil.copyfile(job_file, workdir / JOB_FILE)
    missing = [name for name in env_names if name not in os.environ]
    if missing:
        raise ValueError(f"--env {missing[0]}: not set in this shell; set it or drop the flag")
    env = {"env_vars": {name: os.environ[name] for name in env_names}} if env_names else {}
    return {"working_dir": str(workdir), "py_modules": [str(root / name) for name in PACKAGES], **env}


def follow(client, job_id: str) -> str:
    """Print the job's logs as they come; return its final status."""
    import asyncio

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    try:
        asyncio.run(tail())
    except Exception as err:  # the log stream ended early: the status below still decides
        print(f"logo-batch submit: log stream ended ({err}); waiting for the job to finish", file=sys.stderr)
    while True:
        status = client.get_job_status(job_id)
        if status.is_terminal():
            return status.value
        time.sleep(1)


TOKEN_FIX = ("a cluster started with `ray start` (Ray 2.60 and later) checks a token: run this command with "
             "RAY_AUTH_MODE=token and the cluster's token in RAY_AUTH_TOKEN (or the file RAY_AUTH_TOKEN_PATH "
             "names; on the head node it is ~/.ray/auth_token), or start the cluster with RAY_AUTH_MODE=disabled")


def main(args: argparse.Namespace) -> int:
    job_file = Path(args.config)
    if not job_file.is_file():
        print(f"logo-batch submit: {job_file}: job file not found", file=sys.stderr)
        return 2
    from ray.job_submission import JobSubmissionClient

    with tempfile.TemporaryDirectory(prefix="logo-batch-submit-") as tmp:
        try:
            env = runtime_env(job_file, Path(tmp), args.env_names)
        except ValueError as err:
            print(f"logo-batch submit: {err}", file=sys.stderr)
            return 2
        try:
            client = JobSubmissionClient(args.address)
        except ConnectionError as err:
            print(f"logo-batch submit: no Ray cluster answers at {args.address} ({err}); pass its dashboard "
                  "address, e.g. --address http://head:8265", file=sys.stderr)
            return 2
        except Exception as err:
            if type(err).__name__ != "AuthenticationError":
                raise
            print(f"logo-batch submit: {args.address} requires token authentication: {TOKEN_FIX}", file=sys.stderr)
            return 2
        try:
            job_id = client.submit_job(entrypoint=entrypoint(args.command, args.set_items, args.extra),
                                       runtime_env=env, submission_id=args.submission_id)
        except Exception as err:
            if type(err).__name__ != "AuthenticationError":
                raise
            print(f"logo-batch submit: {args.address} refused the request (token authentication): {TOKEN_FIX}",
                  file=sys.stderr)
            return 2
    print(f"logo-batch submit: job {job_id} submitted to {args.address}", flush=True)
    if not args.wait:
        print(f"  logs: ray job logs --address {args.address} --follow {job_id}")
        return 0
    status = follow(client, job_id)
    print(f"logo-batch submit: job {job_id} {status}")
    return 0 if status == "SUCCEEDED" else 1
