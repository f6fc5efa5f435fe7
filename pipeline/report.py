"""The end-of-run report (printed, returned by `run_job`) and the manifest that stores it."""

from __future__ import annotations

import dataclasses
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from importlib import metadata

from actors.residency import format_bytes
from pipeline.config import JobConfig
from pipeline.config_io import config_hash, config_to_dict
from pipeline.inputs import InputFile
from pipeline.outputs import DATA_DIR, FORMAT, PartFile

TOP = 20
"""How many adapters and error kinds a report lists."""
PROGRESS_EVERY = 9.0
"""Seconds between progress lines while a dataflow runs (the actors' count of rows done)."""


def package_version() -> str:
    try:
        return metadata.version("logo-batch")
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a plain checkout
        return "unknown"


@dataclass(frozen=True)
class RunReport:
    status: str
    """committed: this call completed the run; already_committed: it was complete before (printed
    in words: `already committed`)."""
    output_uri: str
    """The run's output prefix."""
    rows: int
    """Rows in the run (equal to the input rows)."""
    rows_computed: int
    """Rows computed and written by this call (0 when already committed)."""
    rows_resumed: int
    """Rows of the run written by earlier, interrupted attempts."""
    errors: int
    """Rows with an error."""
    warnings: int
    """Rows with a warning (e.g. prompt truncated)."""
    seconds: float
    """Wall time of this call."""
    rows_per_second: float
    """rows_computed / seconds."""
    attempt: str
    """This call's attempt id (it names the data files it wrote)."""
    config_hash: str
    """Hash of the result-deciding configuration."""
    adapter_usage: dict[str, int] = field(default_factory=dict)
    """Adapter -> rows that selected it (most used first, top 20)."""
    error_reasons: dict[str, int] = field(default_factory=dict)
    """Error kind (numbers blanked) -> rows (top 20)."""
    warning_reasons: dict[str, int] = field(default_factory=dict)
    """Warning kind (numbers blanked) -> rows (top 20; a row with two kinds counts for both)."""
    rows_decoded: int = 0
    """Input rows decoded by this call's read tasks: the rows computed, plus at most one row group
    per boundary of earlier attempts' work (0 when already committed)."""
    batching: dict[str, float] = field(default_factory=dict)
    """How the actors batched the run's rows, summed over its data files (peaks: the largest):
    generation batches and calls, groups and mean union sizes, adapter loads (also per 1,000 rows),
    hits, evictions, the peak resident adapters of an actor, grouping and generation seconds."""

    def format(self) -> str:
        lines = [
            f"logo-batch run {self.status.replace('_', ' ')}: {self.output_uri} (config {self.config_hash[:12]})",
            f"  rows {self.rows}: computed now {self.rows_computed}, resumed {self.rows_resumed}; "
            f"errors {self.errors}, warnings {self.warnings}",
            f"  {self.seconds:.1f} s, {self.rows_per_second:.2f} rows/s; input rows decoded {self.rows_decoded}",
        ]
        if self.adapter_usage:
            usage = ", ".join(f"{name} {count}" for name, count in self.adapter_usage.items())
            lines.append(f"  adapter usage (rows): {usage}")
        b = self.batching
        if b.get("batches"):
            lines.append(f"  batches {b['batches']:.0f} ({b['calls']:.0f} generate calls): decode groups {b['decode_groups']:.0f}, "
                         f"mean union {b['mean_decode_union']:.1f}; adapter loads {b['loads']:.0f} "
                         f"({b['loads_per_1000_rows']:.1f} per 1,000 rows), evictions {b['evictions']:.0f}, peak "
                         f"resident {b['peak_resident']:.0f}")
        if b.get("peak_device_bytes"):
            lines.append(f"  peak device memory {format_bytes(b['peak_device_bytes'])} of a budget of "
                         f"{format_bytes(b['peak_device_budget_bytes'])} (an actor's device memory less its headroom)")
        for reason, count in self.error_reasons.items():
            lines.append(f"  error x{count}: {reason}")
        for reason, count in self.warning_reasons.items():
            lines.append(f"  warning x{count}: {reason}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def build_report(config: JobConfig, parts: list[PartFile], attempt: str, started: float, computed: int,
                 status: str = "committed") -> RunReport:
    """`computed`: rows this call's dataflow wrote (counted as they were written, not from files);
    the decoded-rows counter comes from this attempt's data files."""
    seconds = time.time() - started
    total = sum(p.rows for p in parts)
    usage: Counter = Counter()
    reasons: Counter = Counter()
    warned: Counter = Counter()
    batching: Counter = Counter()
    for part in parts:
        usage.update(part.adapter_use)
        reasons.update(part.error_reasons)
        warned.update(part.warning_reasons)
        for key, value in part.batching.items():
            batching[key] = max(batching[key], value) if key.startswith("peak") else batching[key] + value
    return RunReport(
        status=status, output_uri=config.output.uri, rows=total, rows_computed=computed,
        rows_resumed=sum(p.rows for p in parts if p.attempt != attempt), errors=sum(p.errors for p in parts),
        warnings=sum(p.warnings for p in parts), seconds=round(seconds, 3),
        rows_per_second=round(computed / seconds, 3) if seconds > 0 else 0.0, attempt=attempt,
        config_hash=config_hash(config), adapter_usage=dict(usage.most_common(TOP)),
        error_reasons=dict(reasons.most_common(TOP)), warning_reasons=dict(warned.most_common(TOP)),
        rows_decoded=sum(p.decoded for p in parts if p.attempt == attempt),
        batching=batching_summary(batching, sum(p.rows for p in parts if p.batching)),
    )


def batching_summary(totals: Counter, rows: int) -> dict[str, float]:
    """The summed batching counters of data files holding `rows` rows, with their means."""
    if not totals:
        return {}
    out = {k: round(float(v), 3) for k, v in sorted(totals.items())}
    out["mean_union"] = round(totals["union_sum"] / max(1, totals["groups"]), 3)
    out["mean_decode_union"] = round(totals["decode_union_sum"] / max(1, totals["decode_groups"]), 3)
    out["loads_per_1000_rows"] = round(1000 * totals["loads"] / max(1, rows), 3)
    return out


def report_from_manifest(manifest: dict, started: float, attempt: str) -> RunReport:
    """The report of a call that found the run already committed (nothing computed)."""
    old = manifest.get("report", {})
    return dataclasses.replace(
        RunReport(**old), status="already_committed", rows_computed=0, rows_resumed=old.get("rows", 0), rows_decoded=0,
        seconds=round(time.time() - started, 3), rows_per_second=0.0, attempt=attempt)


def build_manifest(config: JobConfig, files: list[InputFile], parts: list[PartFile], report: RunReport,
                   started: float) -> dict:
    attempts: dict[str, dict] = {}
    for part in parts:
        entry = attempts.setdefault(part.attempt, {"attempt": part.attempt, "files": 0, "rows": 0})
        entry["files"] += 1
        entry["rows"] += part.rows
    return {
        "format": FORMAT,
        "package_version": package_version(),
        "config_hash": report.config_hash,
        "config": config_to_dict(config),
        "input": {"uri": config.input.uri, "rows": sum(f.rows for f in files),
                  "files": [{"uri": f.uri, "rows": f.rows} for f in files]},
        "output": {"uri": config.output.uri, "rows": report.rows,
                   "files": [{"path": f"{DATA_DIR}/{p.name}", "rows": p.rows, "errors": p.errors,
                              "attempt": p.attempt} for p in parts]},
        "decoded_rows": report.rows_decoded,
        "errors": {"rows": report.errors, "by_reason": report.error_reasons},
        "warnings": report.warnings,
        "warnings_by_reason": report.warning_reasons,
        "output_tokens": sum(p.output_tokens for p in parts),
        "adapter_usage": report.adapter_usage,
        "batching": report.batching,
        "attempts": sorted(attempts.values(), key=lambda a: a["attempt"]),
        "timings": {"started": _iso(started), "finished": _iso(time.time()), "seconds": report.seconds,
                    "rows_computed": report.rows_computed, "rows_per_second": report.rows_per_second},
        "report": report.to_dict(),
    }


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


class ProgressLine:
    """One progress line: rows done, rows/s and an ETA; rewritten in place on a terminal, else
    printed at most every `every` seconds (and at the end), so logs get one line, not a block.
    Rows only grow (data files written and the actors' own count both update it); the rate and ETA
    count from the first rows done, so the actors' start-up does not inflate the ETA. Thread-safe."""

    def __init__(self, total: int, stream=None, every: float = 10.0):
        import threading

        self.total, self.every = total, every
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.started = self.last = time.monotonic()
        self.rows = 0
        self.first: tuple[float, int] | None = None  # (time, rows) when rows were first seen done
        self.lock = threading.Lock()

    def text(self, rows: int, now: float) -> str:
        if rows == 0 and self.total:
            return (f"logo-batch: 0/{self.total:,} rows, {_clock(now - self.started)} in: waiting for the first "
                    "rows (actors loading the model and adapters)")
        t0, r0 = self.first if self.first is not None else (self.started, 0)
        rate = (rows - r0) / (now - t0) if now - t0 > 1.0 and rows > r0 else rows / max(now - self.started, 1e-9)
        eta = "?" if rate <= 0 else _clock((self.total - rows) / rate)
        share = 100.0 * rows / self.total if self.total else 100.0
        return f"logo-batch: {rows:,}/{self.total:,} rows ({share:.1f}%), {rate:,.1f} rows/s, ETA {eta}"

    def update(self, rows: int, final: bool = False, force: bool = False) -> None:
        """`force`: print now even if the last line is recent (the heartbeat keeps its own pace)."""
        with self.lock:
            now = time.monotonic()
            self.rows = rows = max(rows, self.rows)
            if rows and self.first is None:
                self.first = (now, rows)
            if self.tty:
                end = "\n" if final else ""
                print("\r" + self.text(rows, now), end=end, file=self.stream, flush=True)
            elif final or force or now - self.last >= self.every:
                print(self.text(rows, now), file=self.stream, flush=True)
                self.last = now


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
