"""The benchmark's outputs: a table on stdout, the JSON file, and a PNG plot of the pool-size sweep."""

from __future__ import annotations

import json
from pathlib import Path


def _num(v, fmt: str = "{:.2f}") -> str:
    return "-" if v is None else fmt.format(v)


def table(report: dict) -> str:
    """Markdown tables: one per shape and regime, then the sweep."""
    lines = [f"LoGo throughput benchmark, {report.get('date', '')}, {report.get('machine', '')}",
             f"device {report['device']}, {report['dtype']}, {report['threads']} thread(s), timed by "
             f"{report['clock']} (median of rounds); every ratio is against peft-single in the same run", ""]
    for entry in report["shapes"]:
        for reg in entry["regimes"]:
            r = reg["regime"]
            lines.append(f"### {entry['shape']} ({entry['weights'].split(' (')[0]}, LoRA work per adapter "
                         f"{100 * entry['lora_work_ratio']:.2f}% of the base), {r['name']}: prompts "
                         f"{r['prompt_min']}-{r['prompt_max']} tokens, {r['new_tokens']} new tokens")
            lines.append("")
            lines.append("| method | prompts/s | tokens/s | x peft-single | weights MiB | work MiB "
                         "| groups (prefill/decode) | mean union (prefill/decode) | roofline 1/(1+|U|f) | "
                         "x base / roofline | what |")
            lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
            base = next((m["prompts_per_s"] for m in reg["methods"] if m["name"] == "base"), None)
            for m in reg["methods"]:
                groups = unions = roof = share = "-"
                if m.get("groups") is not None:
                    groups = f"{m['groups']:.1f} / {m['decode_groups']:.1f}"
                    unions = f"{m['mean_union']:.1f} / {m['decode_mean_union']:.1f}"
                    # a decode step reads every decode group's union: |U| per batch is their sum
                    roofline = 1 / (1 + m["decode_groups"] * m["decode_mean_union"] * entry["lora_work_ratio"])
                    roof = f"{roofline:.3f}"
                    share = "-" if not base else f"{m['prompts_per_s'] / base / roofline:.2f}"
                lines.append(f"| {m['name']} | {m['prompts_per_s']:.3f} | {_num(m['tokens_per_s'], '{:.1f}')} | "
                             f"{_num(m.get('x_baseline'))} | {m['weight_mib']:.0f} | {_num(m['work_mib'], '{:.0f}')} | "
                             f"{groups} | {unions} | {roof} | {share} | {m['note']} |")
            lines.append("")
            lines.append("Summary: " + ", ".join(f"{k} {_fmt(v)}" for k, v in reg["summary"].items()))
            lines.append("")
    if report.get("sweep"):
        sw = report["sweep"]
        lines.append(f"### Pool-size sweep ({sw['shape']}, {sw['regime']['name']}, our engine)")
        lines.append("")
        lines.append("| N | k | prompts/s | probe s/batch | pool MiB | work MiB | mean union |")
        lines.append("|---:|---:|---:|---:|---:|---:|---:|")
        for row in sw["rows"]:
            lines.append(f"| {row['pool']} | {row['k']} | {row['prompts_per_s']:.3f} | {row['probe_s']:.3f} | "
                         f"{row['pool_mib']:.0f} | {_num(row['work_mib'], '{:.0f}')} | {row['mean_union']:.1f} |")
        lines.append("")
    return "\n".join(lines)


def _fmt(v) -> str:
    if isinstance(v, dict):
        return "{" + ", ".join(f"k={k}: {x:.2f}" for k, x in v.items()) + "}"
    return f"{v:.2f}"


def write_json(report: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1, default=str))


def plot_sweep(report: dict, path: Path) -> bool:
    """Seconds per prompt and extra memory against pool size, one line per k. False if no sweep."""
    sw = report.get("sweep")
    if not sw:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 4))
    for k in sorted({r["k"] for r in sw["rows"]}):
        rows = [r for r in sw["rows"] if r["k"] == k]
        pools = [r["pool"] for r in rows]
        ax_t.plot(pools, [r["median_seconds"] / r["prompts"] for r in rows], "o-", label=f"k={k}")
        ax_t.plot(pools, [r["probe_s"] / r["prompts"] for r in rows], "x:", color=ax_t.lines[-1].get_color(),
                  label=f"k={k}: probe part")
        ax_m.plot(pools, [r["peak_mib"] for r in rows], "o-", label=f"k={k}")
    for ax in (ax_t, ax_m):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("adapters in the pool (N)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    ax_t.set_ylabel("seconds per prompt")
    ax_m.set_ylabel("weights + working memory (MiB)")
    fig.suptitle(f"LoGo engine vs pool size: {sw['shape']}, {sw['regime']['name']} regime, {report['device']}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
