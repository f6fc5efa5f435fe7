"""The run report's plots (matplotlib, Agg backend) and its Markdown, drawn from `report.json`'s data."""

from __future__ import annotations

from collections.abc import Callable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

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
    _bars(ax, report["top_weight"]["histogram"], "top weight of the row", "rows", width=report["top_weight"]["step"])
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


def errors(report: dict):
    fig, ax = plt.subplots(figsize=(9, 4))
    reasons = list(report["errors_by_reason"].items())[:TOP_ROWS]
    if not reasons:
        _empty(ax, f"no error rows among {report['rows']}")
    else:
        ax.barh([r[:60] for r, _ in reasons], [c for _, c in reasons], color="tab:red")
        ax.invert_yaxis()
        ax.set_xlabel("rows")
    ax.set_title(f"error rows by reason ({report['errors']} of {report['rows']})")
    fig.tight_layout()
    return fig


def tokens(report: dict):
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    _bars(left, report["prompt_tokens"]["histogram"], "prompt tokens", "rows", width=1.0)
    _bars(right, report["output_tokens"]["histogram"], "output tokens", "rows", width=1.0)
    left.set_title("prompt tokens")
    right.set_title("output tokens")
    fig.tight_layout()
    return fig


def groups(report: dict):
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    g = report["groups"]
    _bars(left, g["batch_union_size"]["histogram"], "adapters in the batch's union", "batches")
    left.set_title(f"union of each batch of {g['batch_size']} rows ({g['batches']} batches)")
    _bars(right, g["union_size"]["histogram"], "adapters in the group's union", "groups")
    right.set_title(f"decode groups, replayed on {g['replayed_batches']} batches")
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
"""Plot name (its PNG file under `report/`) -> function drawing it from the report."""


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
        "", "## Adapters", "", "![adapters](report/adapters.png)", "",
        "| adapter | rows | mean weight |", "|---|---:|---:|",
        *(f"| {a['adapter']} | {a['rows']} | {a['mean_weight']:.4f} |" for a in report["adapters"][:TOP_ROWS]),
        "", f"{len(report['adapters'])} adapters selected at least once.", "",
        "## Top weight", "", "![top weight](report/top_weight.png)", "",
        *_confidence_lines(report.get("confidence")),
        "## Rows/s over time", "", "![throughput](report/throughput.png)", "",
        "| attempt | rows | rows/s |", "|---|---:|---:|",
        *(f"| {t['attempt']} | {t['rows']} | {t['rows_per_second']} |" for t in report["throughput"]),
        "", "## Error rows by reason", "", "![errors](report/errors.png)", "",
    ]
    if report["errors_by_reason"]:
        lines += ["| reason | rows |", "|---|---:|",
                  *(f"| {r} | {c} |" for r, c in list(report["errors_by_reason"].items())[:TOP_ROWS])]
    else:
        lines.append("No error rows.")
    groups_ = report["groups"]
    lines += [
        "", "## Tokens", "", "![tokens](report/tokens.png)", "",
        "| | rows | mean | p50 | p90 | p99 | max |", "|---|---:|---:|---:|---:|---:|---:|",
        _stat_line("prompt tokens", report["prompt_tokens"]), _stat_line("output tokens", report["output_tokens"]),
        "", "## Group union sizes", "", "![groups](report/groups.png)", "",
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
    lines = ["## Confidence", "", "![confidence](report/confidence.png)", "",
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
            f"{b['loads']:.0f} | {b['loads_per_1000_rows']:.1f} | {b['evictions']:.0f} | {b['peak_resident']:.0f} |", ""]
