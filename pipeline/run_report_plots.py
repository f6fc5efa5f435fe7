"""The run report's plots (matplotlib, Agg backend) and its Markdown, drawn from `report.json`'s data."""

from __future__ import annotations

from collections.abc import Callable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator, NullFormatter, ScalarFormatter  # noqa: E402

from actors.residency import format_bytes  # noqa: E402

TOP_ADAPTERS = 40
"""Adapters drawn in the adapter plot (most selected first)."""
TOP_ROWS = 20
"""Adapters and error reasons listed in the Markdown."""


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def adapters(report: dict):
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5))
    shown = report["adapters"][:TOP_ADAPTERS]
    if not shown:
        _empty(left, "no adapter selected")
        _empty(right, "no adapter selected")
    else:
        names = [a["adapter"] for a in shown]
        left.barh(names, [a["rows"] for a in shown])
        left.set_xlabel("rows that selected it")
        right.barh(names, [a["mean_weight"] for a in shown], color="tab:orange")
        right.set_xlabel("mean weight where selected")
        for ax in (left, right):
            ax.invert_yaxis()
    fig.suptitle(f"adapter selections ({len(report['adapters'])} adapters, top {min(len(shown), TOP_ADAPTERS)})")
    fig.tight_layout()
    return fig


def _bars(ax, histogram: dict, xlabel: str, ylabel: str, width: float = 0.8) -> None:
    if not histogram:
        _empty(ax, "no rows")
        return
    ax.bar([float(k) for k in histogram], list(histogram.values()), width=width)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    if width >= 0.8:  # integer values (tokens, adapters)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)


def top_weight(report: dict):
    fig, ax = plt.subplots(figsize=(7, 4))
    histogram = report["top_weight"]["histogram"]
    if len(histogram) == 1:  # k = 1 (or one weight for every row): a single bar would say nothing
        (value, rows), = histogram.items()
        _empty(ax, f"every routed row ({rows}) has top weight {value}"
               + ("\n(k = 1: one adapter per row, weight 1)" if float(value) == 1.0 else ""))
    else:
        _bars(ax, histogram, "top weight of the row", "rows", width=report["top_weight"]["step"])
        ax.set_xlim(0, 1.02)
    ax.set_title("distribution of each row's top weight")
    fig.tight_layout()
    return fig


def confidence(report: dict):
    fig, ax = plt.subplots(figsize=(7, 4))
    conf = report.get("confidence") or {"histogram": {}, "step": 0.1, "base_only_rows": 0}
    _bars(ax, conf["histogram"], "confidence of the row (calibrated top score per pair)", "rows", width=conf["step"])
    ax.set_title(f"distribution of each row's confidence ({conf['base_only_rows']} rows by the base model alone)")
    fig.tight_layout()
    return fig


def throughput(report: dict):
    fig, ax = plt.subplots(figsize=(7, 4))
    if not report["throughput"]:
        _empty(ax, "no data files")
    for record in report["throughput"]:
        points = [(0.0, 0)] + [tuple(p) for p in record["points"]]
        times, rates = [], []
        for (t0, r0), (t1, r1) in zip(points, points[1:]):
            if t1 > t0:
                times.append(t1)
                rates.append((r1 - r0) / (t1 - t0))
        if times:  # each rate holds from the previous file (or the attempt's start) to this file
            ax.step([0.0, *times], [rates[0], *rates], where="pre", label=record["attempt"])
    ax.set_xlabel("seconds since the attempt started")
    ax.set_ylabel("rows/s (between data files)")
    ax.set_title("rows/s over time")
    if report["throughput"]:
        ax.legend(title="attempt", fontsize="small")
    fig.tight_layout()
    return fig


def _wrapped(text: str, width: int = 48, lines: int = 3) -> str:
    import textwrap

    parts = textwrap.wrap(text, width) or [""]
    return "\n".join(parts[:lines]) + ("..." if len(parts) > lines else "")


def errors(report: dict):
    reasons = list(report["errors_by_reason"].items())[:TOP_ROWS]
    fig, ax = plt.subplots(figsize=(11, 1.5 + 0.6 * max(len(reasons), 3)))
    if not reasons:
        _empty(ax, f"no error rows among {report['rows']}")
    else:
        ax.barh([_wrapped(r) for r, _ in reasons], [c for _, c in reasons], color="tab:red")
        ax.invert_yaxis()
        ax.tick_params(axis="y", labelsize="small")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("rows")
    ax.set_title(f"error rows by reason ({report['errors']} of {report['rows']})")
    fig.tight_layout()
    return fig


def _log_histogram(ax, stats: dict, xlabel: str) -> None:
    """Rows by token count on a log axis (log-spaced bins) when the counts span more than a factor of
    ten, so one outlier does not flatten the rest; p50 and p99 marked."""
    import numpy as np

    histogram = stats["histogram"]
    if not histogram:
        _empty(ax, "no rows")
        return
    values = np.array([int(k) for k in histogram], dtype=float)
    counts = np.array(list(histogram.values()), dtype=float)
    low = max(1.0, values.min())
    if values.max() < 10 * low:  # a narrow range: plain bars say it better than a log axis
        _bars(ax, histogram, xlabel, "rows", width=1.0)
        return
    edges = np.unique(np.round(np.geomspace(low, values.max() + 2, 40))) - 0.5
    ax.hist(np.maximum(values, low), bins=edges, weights=counts)
    ax.set_xscale("log")
    ax.set_xlim(edges[0], edges[-1])
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    for name, style in (("p50", "--"), ("p99", ":")):
        ax.axvline(max(stats[name], 1), color="black", linestyle=style, label=f"{name} {stats[name]}")
    ax.legend(fontsize="small")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(f"{xlabel} (log scale)")
    ax.set_ylabel("rows")


def tokens(report: dict):
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    _log_histogram(left, report["prompt_tokens"], "prompt tokens")
    _log_histogram(right, report["output_tokens"], "output tokens")
    left.set_title(f"prompt tokens (max {report['prompt_tokens']['max']})")
    right.set_title(f"output tokens (max {report['output_tokens']['max']})")
    fig.tight_layout()
    return fig


def groups(report: dict):
    g = report["groups"]
    if not g["grouping"]:  # every generate call mixes all its rows: its groups are the batches
        fig, left = plt.subplots(figsize=(7, 4))
        right = None
    else:
        fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    _bars(left, g["batch_union_size"]["histogram"], "adapters in the batch's union", "batches")
    left.set_title(f"union of each batch of {g['batch_size']} rows ({g['batches']} batches)", fontsize="medium")
    if right is not None:
        _bars(right, g["union_size"]["histogram"], "adapters in the group's union", "groups")
        right.set_title(f"decode groups, replayed on {g['replayed_batches']} batches", fontsize="medium")
    fig.tight_layout()
    return fig


def _closing(draw: Callable) -> Callable:
    """The figure, registered nowhere: pyplot forgets it once drawn, so many reports leak nothing."""
    def run(report: dict):
        fig = draw(report)
        plt.close(fig)
        return fig
    return run


PLOTS: dict[str, Callable] = {name: _closing(fn) for name, fn in [
    ("adapters", adapters), ("top_weight", top_weight), ("confidence", confidence), ("throughput", throughput),
    ("errors", errors),
    ("tokens", tokens), ("groups", groups)]}
"""Plot name (its PNG file under `_report/`, beside `report.md`) -> function drawing it from the report."""


def _stat_line(name: str, stats: dict) -> str:
    if not stats["rows"]:
        return f"| {name} | 0 | | | | | |"
    return (f"| {name} | {stats['rows']} | {stats['mean']} | {stats['p50']} | {stats['p90']} | {stats['p99']} "
            f"| {stats['max']} |")


def markdown(report: dict) -> str:
    rate = report["rows_per_second"]
    lines = [
        f"# Run report: {report['output_uri']}", "",
        f"- rows {report['rows']}, errors {report['errors']}, warnings {report['warnings']}, "
        f"data files {report['files']}",
        f"- configuration hash {str(report['config_hash'])[:12]}; last call {report['seconds']} s"
        + (f", {rate} rows/s" if rate else ""),
        "", "## Adapters", "", "![adapters](adapters.png)", "",
        "| adapter | rows | mean weight |", "|---|---:|---:|",
        *(f"| {a['adapter']} | {a['rows']} | {a['mean_weight']:.4f} |" for a in report["adapters"][:TOP_ROWS]),
        "", f"{len(report['adapters'])} adapters selected at least once.", "",
        "## Top weight", "", "![top weight](top_weight.png)", "",
        *_confidence_lines(report.get("confidence")),
        "## Rows/s over time", "", "![throughput](throughput.png)", "",
        "| attempt | rows | rows/s |", "|---|---:|---:|",
        *(f"| {t['attempt']} | {t['rows']} | {t['rows_per_second']} |" for t in report["throughput"]),
        "", "## Error rows by reason", "", "![errors](errors.png)", "",
    ]
    if report["errors_by_reason"]:
        lines += ["| reason | rows |", "|---|---:|",
                  *(f"| {r} | {c} |" for r, c in list(report["errors_by_reason"].items())[:TOP_ROWS])]
    else:
        lines.append("No error rows.")
    warned = list(report.get("warnings_by_reason", {}).items())[:TOP_ROWS]  # absent in older reports
    lines += ["", "## Warning rows by reason", ""]
    lines += (["| reason | rows |", "|---|---:|", *(f"| {r} | {c} |" for r, c in warned)] if warned
              else ["No warning rows."])
    groups_ = report["groups"]
    lines += [
        "", "## Tokens", "", "![tokens](tokens.png)", "",
        "| | rows | mean | p50 | p90 | p99 | max |", "|---|---:|---:|---:|---:|---:|---:|",
        _stat_line("prompt tokens", report["prompt_tokens"]), _stat_line("output tokens", report["output_tokens"]),
        "", "## Group union sizes", "", "![groups](groups.png)", "",
        f"Batches of {groups_['batch_size']} rows of each data file ({groups_.get('ordering', 'input')} order): "
        f"{groups_['batches']}; "
        f"decode groups replayed with `actors.grouping` (grouping {groups_['grouping']}, max_groups "
        f"{groups_['max_groups']}) on {groups_['replayed_batches']} of them: {groups_['groups']} groups.", "",
        "| | count | mean | p50 | p90 | p99 | max |", "|---|---:|---:|---:|---:|---:|---:|",
        _stat_line("batch union size", groups_["batch_union_size"]),
        _stat_line("group union size", groups_["union_size"]), "",
        *_batching_lines(report.get("batching") or {}),
    ]
    return "\n".join(lines)


def _confidence_lines(conf: dict | None) -> list[str]:
    """The confidence histogram, the rows by the base model alone, and the lowest-confidence rows."""
    if conf is None:  # a run of an older version
        return []
    lines = ["## Confidence", "", "![confidence](confidence.png)", "",
             f"{conf['rows']} rows with a confidence (the calibrated top score per pair: about 0 where the best adapter "
             "fits no better than on average); quantiles "
             + (", ".join(f"{k} {v}" for k, v in conf["quantiles"].items()) or "none")
             + f"; {conf['base_only_rows']} rows generated by the base model alone.", ""]
    if conf["lowest"]:
        lines += [f"Lowest-confidence rows, for review first ({len(conf['lowest'])}):", "",
                  "| id | confidence | adapters |", "|---|---:|---|",
                  *(f"| {str(r['id']).replace('|', chr(92) + '|')} | {r['confidence']:.4f} | {', '.join(r['adapters']) or '(base model)'} |"
                    for r in conf["lowest"]), ""]
    return lines


def _batching_lines(b: dict) -> list[str]:
    """What the actors measured while batching (absent in runs of older versions)."""
    if not b.get("batches"):
        return []
    return ["## Batching as measured", "",
            "| generation batches | generate calls | decode groups | mean decode union | adapter loads | "
            "loads / 1,000 rows | evictions | peak resident adapters |", "|---:|---:|---:|---:|---:|---:|---:|---:|",
            f"| {b['batches']:.0f} | {b['calls']:.0f} | {b['decode_groups']:.0f} | {b['mean_decode_union']:.2f} | "
            f"{b['loads']:.0f} | {b['loads_per_1000_rows']:.1f} | {b['evictions']:.0f} | {b['peak_resident']:.0f} |", "",
            *([f"Peak device memory of an actor: {format_bytes(b['peak_device_bytes'])} of a budget of "
               f"{format_bytes(b['peak_device_budget_bytes'])} (its device memory less `resources.memory_headroom`).", ""]
              if b.get("peak_device_bytes") else [])]
