"""Rendering of the quality benchmark's results: a Markdown report and a weight heatmap."""

from __future__ import annotations

from pathlib import Path

SHORT = {"boolean_expressions": "bool", "arithmetic": "arith", "word_sorting": "sort",
         "object_counting": "count", "date_to_iso": "date", "word_order_reversal": "rev",
         "letter_counting": "letters", "unit_conversion": "units", "review_sentiment": "sent",
         "list_max": "max", "colored_objects": "color", "number_parity": "parity"}


def _short(task: str) -> str:
    return SHORT.get(task, task[:8])


def _pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.0f}"


def markdown_report(results: dict) -> str:
    """Two tables: exact match per method (overall and per task), and routing accuracy."""
    tasks = results["heatmap_tasks"]
    head = ["method", "EM", "own sel."] + [_short(t) for t in tasks]
    lines = [f"LoGo quality benchmark, {results['n_prompts']} held-out prompts "
             f"({results['config']['per_task']} per task), {results['date']}, {results['machine']}.",
             "EM: exact match (%), overall and per task; own sel.: share of prompts whose own task "
             "adapter is among the selected (%).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in results["methods"].items():
        cells = [name, _pct(m["exact_match"]), _pct(m.get("own_selected"))]
        cells += [_pct(m["per_task"].get(t)) for t in tasks]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Routing accuracy: share of prompts whose top-scored adapter is their own task's (%).", "",
              "| probe | overall | " + " | ".join(_short(t) for t in tasks) + " | most frequent top-1 |",
              "|" + "---|" * (len(tasks) + 3)]
    for label, r in results["routing_accuracy"].items():
        counts = sorted(r["top1_counts"].items(), key=lambda kv: -kv[1])[:2]
        top = ", ".join(f"{_short(a)} {c}" for a, c in counts)
        lines.append(f"| {label} | {_pct(r['overall'])} | "
                     + " | ".join(_pct(r["per_task"].get(t)) for t in tasks) + f" | {top} |")
    if results.get("calibration"):
        lines += ["", *calibration_table(results["calibration"])]
    return "\n".join(lines) + "\n"


def calibration_table(study: dict) -> list[str]:
    """Routing accuracy (and exact match where measured) per mix, probe and score variant."""
    cfg = study["config"]
    lines = [f"Calibrated routing: routing accuracy (%) and exact match (%) where measured. `input`: statistics "
             f"from a seeded sample of {cfg['input_sample']} of the evaluated prompts; `reference`: the "
             f"{cfg['reference_prompts']} shipped task-neutral prompts. Skewed mix: {cfg['skew_rows']} prompts, "
             f"{100 * cfg['skew_share']:.0f}% {cfg['skew_task']} (routing on majority / minority prompts).", "",
             "| mix | probe | scores | routing | majority / minority | EM k=1 | EM k=3 |", "|---|---|---|---|---|---|---|"]
    for mix, probes in study["results"].items():
        for probe, variants in probes.items():
            for variant, e in variants.items():
                split = (f"{_pct(e['routing_accuracy_majority'])} / {_pct(e['routing_accuracy_minority'])}"
                         if "routing_accuracy_majority" in e else "")
                lines.append(f"| {mix} | {probe} | {variant} | {_pct(e['routing_accuracy'])} | {split} | "
                             f"{_pct(e.get('exact_match_k1'))} | {_pct(e.get('exact_match_k3'))} |")
    return lines


def plot_heatmap(results: dict, path: Path) -> None:
    """Mean LoGo weight per (task, adapter), one panel per recorded setting, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = results["heatmaps"]
    tasks, pool = results["heatmap_tasks"], results["adapters"]
    # columns in the rows' task order (then any other adapter), so own adapters lie on the diagonal
    adapters = [t for t in tasks if t in pool] + [a for a in pool if a not in tasks]
    columns = [pool.index(a) for a in adapters]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 5.6), squeeze=False)
    for ax, (title, matrix) in zip(axes[0], panels.items()):
        matrix = [[row[c] for c in columns] for row in matrix]
        image = ax.imshow(matrix, cmap="viridis", vmin=0.0, aspect="auto")
        ax.set_xticks(range(len(adapters)), [_short(a) for a in adapters], rotation=60, ha="right")
        ax.set_yticks(range(len(tasks)), [_short(t) for t in tasks])
        ax.set_xlabel("adapter")
        ax.set_ylabel("task of the prompt")
        ax.set_title(f"mean weight: {title}")
        fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
