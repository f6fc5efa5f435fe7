"""`logo-batch report`: (re)write the report of a committed run and print where it is.

    logo-batch report runs/2026-11-28                      # local output directory
    logo-batch report s3://results/logo/2026-11-28 --endpoint http://127.0.0.1:8333
    logo-batch report --compare runs/2026-11-27 runs/2026-11-28  # what shifted from A to B

Writes `_report/report.json`, `_report/report.md` and `_report/*.png` beside the run's data (see
`pipeline/run_report.py` for what each holds). `logo-batch run` writes them after every commit;
this command redraws them, e.g. for a run committed by an older version. With `--compare A B` it
compares two committed runs instead (`pipeline/compare.py`: adapter use, confidence, error and
warning rates, rows/s, the rows whose routing changed most) and writes `_report/compare.md`,
`compare.json` and `compare.png` beside B. Exit status 2 when
there is no committed run at OUTPUT, or it is damaged (a missing or unreadable manifest or data
file: the message says which, and how to repair it).
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output", metavar="OUTPUT", nargs="?", help="output directory or s3:// prefix of a committed run (default: none, with --compare)")
    parser.add_argument("--compare", nargs=2, metavar=("OUTPUT_A", "OUTPUT_B"), default=None,
                        help="compare two committed runs, B (the newer) against A (default: none, report OUTPUT)")
    parser.add_argument("--endpoint", default=None, help="S3 endpoint URL (default: AWS_ENDPOINT_URL, else AWS)")


def main(args: argparse.Namespace) -> int:
    from pipeline import ConfigError, OutputError, StorageConfig
    from pipeline.run_report import PLOT_DIR, REPORT_JSON, REPORT_MD, write_run_report

    from botocore.exceptions import BotoCoreError, ClientError

    if (args.output is None) == (args.compare is None):
        print("logo-batch report: give OUTPUT, or --compare OUTPUT_A OUTPUT_B", file=sys.stderr)
        return 2
    if args.compare:
        return _compare(*args.compare, StorageConfig(endpoint=args.endpoint))
    try:
        report = write_run_report(args.output, StorageConfig(endpoint=args.endpoint))
    except (OutputError, ConfigError) as err:  # not committed, damaged, or storage refused: says which and the fix
        print(f"logo-batch report: {err}", file=sys.stderr)
        return 2
    except (BotoCoreError, ClientError) as err:
        print(f"logo-batch report: {args.output}: {err}; check the URI, --endpoint and the credentials",
              file=sys.stderr)
        return 2
    base = args.output.rstrip("/")
    print(f"logo-batch report: {report['rows']} rows, {report['errors']} errors, "
          f"{len(report['adapters'])} adapters selected\n  {base}/{REPORT_MD}\n  {base}/{REPORT_JSON}\n"
          f"  {base}/{PLOT_DIR}/*.png")
    return 0


def _compare(a: str, b: str, storage_cfg) -> int:
    from botocore.exceptions import BotoCoreError, ClientError

    from pipeline import ConfigError, OutputError
    from pipeline.compare import COMPARE_MD, markdown, write_comparison

    try:
        cmp = write_comparison(a, b, storage_cfg)
    except (OutputError, ConfigError) as err:
        print(f"logo-batch report: {err}", file=sys.stderr)
        return 2
    except (BotoCoreError, ClientError) as err:
        print(f"logo-batch report: {err}; check the URIs, --endpoint and the credentials", file=sys.stderr)
        return 2
    print(markdown(cmp))
    print(f"logo-batch report: wrote {b.rstrip('/')}/{COMPARE_MD} (and compare.json, compare.png)")
    return 0
