"""`logo-batch nightly`: one night of a dated labelling job.

    logo-batch nightly --config nightly.yaml                     # yesterday (UTC)
    logo-batch nightly --config nightly.yaml --date 2026-11-28   # that night
    logo-batch nightly --config nightly.yaml --date 2026-11-28 --force

The configuration is a job file (as for `logo-batch run`) whose values may contain `{date}`,
replaced by the night's date (YYYY-MM-DD), e.g.

    input:  {uri: "s3://prompts/nightly/{date}/"}
    output: {uri: "s3://results/logo/nightly/{date}"}

A night whose output is already committed is skipped (exit 0, saying so) before anything else is
read but a listing of its input; one committed with another configuration, or whose input files
changed since, is refused (exit 2); `--force` computes it again, and the committed night stays
readable until the new one commits (its files are deleted only then; an interrupted `--force`
leaves the old night readable, and the next `--force` resumes the replacement). An input URI
without `{date}` would make every night read the same input: it is refused unless
`--fixed-input` (or `--force`) says that is meant. A night that was interrupted resumes: only its
missing rows are computed. Exit status as for `run`: 0 when the night is committed (now or
before), 2 for a configuration, input or output problem, 1 for other failures.
"""

from __future__ import annotations

import argparse
import datetime as dt
from typing import Any

DATE_FIELD = "{date}"


def yesterday_utc() -> str:
    return (dt.datetime.now(dt.timezone.utc).date() - dt.timedelta(days=1)).isoformat()


def parse_date(text: str) -> str:
    """`YYYY-MM-DD`, checked (an argparse type)."""
    try:
        if len(text) == 10:
            return dt.date.fromisoformat(text).isoformat()
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"{text!r} is not a date written YYYY-MM-DD, e.g. 2026-11-28")


def fill_date(value: Any, date: str) -> Any:
    """`value` (YAML data) with `{date}` replaced by `date` in every string."""
    if isinstance(value, str):
        return value.replace(DATE_FIELD, date)
    if isinstance(value, dict):
        return {key: fill_date(item, date) for key, item in value.items()}
    if isinstance(value, list):
        return [fill_date(item, date) for item in value]
    return value


def night_config(path: str, date: str, overrides: dict | None = None, fixed_input: bool = False):
    """The job of one night: the file's and the overrides' `{date}` filled in, then checked; an
    input URI without `{date}` only with `fixed_input`."""
    from pipeline import ConfigError, config_from_dict
    from pipeline.config_io import apply_overrides, read_yaml

    data = apply_overrides(read_yaml(path), overrides or {})
    if DATE_FIELD not in str((data.get("output") or {}).get("uri", "")):
        raise ConfigError(f"output.uri: has no {DATE_FIELD} field, so every night would write (and find "
                          f"committed) the same output; write it as e.g. s3://bucket/prefix/{DATE_FIELD}")
    if DATE_FIELD not in str((data.get("input") or {}).get("uri", "")) and not fixed_input:
        raise ConfigError(f"input.uri: has no {DATE_FIELD} field, so every night would read the same input; write "
                          f"it as e.g. s3://bucket/prompts/{DATE_FIELD}/, or pass --fixed-input if one input for "
                          "every night is meant")
    return config_from_dict(fill_date(data, date))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="job file (YAML) whose values may contain {date}")
    parser.add_argument("--date", type=parse_date, default=None,
                        help="the night to run, YYYY-MM-DD (default: yesterday, UTC)")
    parser.add_argument("--force", action="store_true",
                        help="recompute a night that is already committed (and accept an input without {date})")
    parser.add_argument("--fixed-input", action="store_true",
                        help="accept an input.uri without {date}: every night reads the same input")
    parser.add_argument("--set", dest="set_items", action="append", default=[], metavar="KEY=VALUE",
                        help="set any configuration key ({date} filled in too), e.g. --set resources.actors=8")


def main(args: argparse.Namespace) -> int:
    from jobs.run import run_to_exit
    from pipeline import OutputError, storage
    from pipeline.commit import committed_manifest
    from pipeline.config_io import config_hash, parse_set
    from pipeline.outputs import MANIFEST, SUCCESS, read_json
    from pipeline.placement import placed

    date = args.date or yesterday_utc()

    def build():
        fixed = args.fixed_input or args.force
        config = placed(night_config(args.config, date, parse_set(args.set_items), fixed))  # hashed as run_job does
        out = config.output.uri
        if storage.read_bytes(storage.join(out, SUCCESS), config.storage) is not None and not args.force:
            committed = read_json(storage.join(out, MANIFEST), config.storage) or {}
            if committed.get("config_hash") != config_hash(config):
                raise OutputError(f"{date} is committed at {out} by a job with another configuration (hash "
                                  f"{str(committed.get('config_hash'))[:12]}, this one {config_hash(config)[:12]}); "
                                  "pass --force to compute the night again with this one")
            committed_manifest(config)  # refuses a night whose input changed since, naming the files
            print(f"logo-batch nightly: {date} is already committed at {out}; nothing to do "
                  "(--force computes it again)")
            return 0
        print(f"logo-batch nightly: {date}: {config.input.uri} -> {out}", flush=True)
        return config

    status = run_to_exit("nightly", build, replace=args.force)
    if status == 0:
        compare_with_previous(args, date)
    return status


NIGHTS_BACK = 31
"""How many nights back `compare_with_previous` looks for a committed one."""


def compare_with_previous(args: argparse.Namespace, date: str) -> None:
    """Add to the night's report a comparison with the previous committed night of the same job file
    (`pipeline.compare`), when there is one in the last `NIGHTS_BACK` nights; the night stands
    without it."""
    from pipeline import storage
    from pipeline.compare import append_to_report, write_comparison
    from pipeline.config_io import parse_set
    from pipeline.outputs import SUCCESS

    overrides = parse_set(args.set_items)
    config = night_config(args.config, date, overrides, fixed_input=True)
    day = dt.date.fromisoformat(date)
    for back in range(1, NIGHTS_BACK + 1):
        before = (day - dt.timedelta(days=back)).isoformat()
        previous = night_config(args.config, before, overrides, fixed_input=True).output.uri
        if storage.read_bytes(storage.join(previous, SUCCESS), config.storage) is None:
            continue
        try:
            cmp = write_comparison(previous, config.output.uri, config.storage)
            append_to_report(config.output.uri, cmp, config.storage)
        except Exception as err:  # the night is committed; `logo-batch report --compare` redraws it
            print(f"logo-batch nightly: {date} is committed, but its comparison with {before} was not written "
                  f"({err}); run logo-batch report --compare {previous} {config.output.uri}")
            return
        shares = ", ".join(f"{r['adapter']} {100 * r['change']:+.1f}%" for r in cmp["adapters"][:3])
        print(f"logo-batch nightly: compared with {before} ({previous}): adapter share changes {shares or 'none'}; "
              f"error rows {100 * cmp['rates']['error_rate_change']:+.2f}%; see _report/report.md")
        return
    print(f"logo-batch nightly: no committed night in the {NIGHTS_BACK} before {date} to compare with")
