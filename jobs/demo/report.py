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


def bigbench_report(results: dict, command: str = "") -> str:
    """The BIG-bench tables: EM per method on both blocks, per task; routing top-1 on the pool's tasks."""
    cfg = results["config"]
    pool, held = [t.replace("/", "__") for t in cfg["pool_tasks"]], list(cfg["held_out_tasks"])
    names = {t.replace("/", "__"): t for t in cfg["pool_tasks"]}
    lines = [f"LoGo on BIG-bench: {results['n_pool_prompts']} test prompts of the pool's {len(pool)} tasks and "
             f"{results['n_held_out_prompts']} of {len(held)} held-out BBH tasks (no adapter of their own), "
             f"{cfg['per_task']} per task, mixed; {results['date']}, {results['machine']}.",
             *([f"Command: `{command}`."] if command else []),
             "EM: exact match (%), first line against any accepted answer, case and a final period ignored. "
             "own sel.: share of pool prompts whose own adapter is among the selected (%). "
             + (f"The paper preset's best k here: {results['paper_best_k']}." if "paper_best_k" in results
                else "Routing only: nothing generated."), ""]
    if results["methods"]:
        lines += ["| method | EM pool | EM held-out | own sel. | adapters per prompt |", "|---|---|---|---|---|"]
    for name, m in results["methods"].items():
        mean = m.get("mean_selected")
        lines.append(f"| {name} | {_pct(m['exact_match']['pool'])} | {_pct(m['exact_match']['held_out'])} | "
                     f"{_pct(m.get('own_selected'))} | {'' if mean is None else f'{mean:.1f}'} |")
    lines += fallback_table(results)
    lines += uncertain_table(results)
    lines += ["", "Routing top-1 on the pool's tasks (%): share of prompts whose top-scored adapter is their own.", "",
              "| routing | " + " | ".join(results["routing_top1"]) + " |", "|---|" + "---|" * len(results["routing_top1"]),
              "| all pool tasks | " + " | ".join(_pct(r["overall"]) for r in results["routing_top1"].values()) + " |"]
    for t in pool:
        lines.append(f"| {names[t]} | " + " | ".join(_pct(r["per_task"][names[t]])
                                                   for r in results["routing_top1"].values()) + " |")
    for title, block in (("Exact match per pool task (%)", [names[t] for t in pool]),
                         ("Exact match per held-out BBH task (%), no adapter of their own", held)):
        methods = [n for n, m in results["methods"].items() if any(m["per_task"].get(t) is not None for t in block)]
        if not methods:
            continue
        lines += ["", f"{title}.", "", "| task | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
        for t in block:
            lines.append(f"| {t} | " + " | ".join(_pct(results["methods"][n]["per_task"].get(t)) for n in methods) + " |")
    return "\n".join(lines) + "\n"


def fallback_table(results: dict) -> list[str]:
    """The base-model fallback swept: EM on both blocks and the share of rows sent to the base model."""
    fallback = results.get("fallback")
    if not fallback:
        return []
    names = list(fallback)
    lines = ["", "Base-model fallback (`routing.min_confidence`) swept on the rows above: EM pool / EM held-out "
             "(%), and the share of pool / held-out rows sent to the base model (%). Chosen by the rule (pool EM "
             ">= 0.97x without it, held-out EM >= the base model's): "
             + "; ".join(f"{n}: {'none qualifies' if fallback[n]['choice'] is None else fallback[n]['choice']}"
                         for n in names) + ".", "",
             "| min_confidence | " + " | ".join(f"{n}: EM | sent to base" for n in names) + " |",
             "|---|" + "---|---|" * len(names)]
    for i, line in enumerate(fallback[names[0]]["sweep"]):
        t = line["min_confidence"]
        cells = []
        for n in names:
            s = fallback[n]["sweep"][i]
            cells += [f"{_pct(s['pool_em'])} / {_pct(s['held_out_em'])}",
                      f"{_pct(s['pool_fallback'])} / {_pct(s['held_out_fallback'])}"]
        lines.append(f"| {'off' if t is None else t} | " + " | ".join(cells) + " |")
    return lines


def uncertain_table(results: dict) -> list[str]:
    """Per-row k swept: rows whose confidence is below t mix uncertain_k adapters instead of 1."""
    sweeps = results.get("uncertain")
    if not sweeps:
        return []
    names = list(sweeps)
    choice = results.get("uncertain_choice", {})
    lines = ["", "Per-row k (`routing.uncertain_below`, `routing.uncertain_k`) swept on the rows above: EM pool / "
             "EM held-out (%) when rows whose confidence is below t mix uncertain_k adapters instead of 1, and the "
             "share of rows widened (%). Chosen (pool EM >= 0.97x k = 1's, held-out EM above it, the best "
             "held-out EM): " + "; ".join(f"{n}: {'none qualifies' if c is None else f'uncertain_below={c[0]:g}, uncertain_k={c[1]}'}"
                                         for n, c in choice.items()) + ".", "",
             "| uncertain_below | " + " | ".join(f"{n}: EM | widened" for n in names) + " |",
             "|---|" + "---|---|" * len(names)]
    for i, line in enumerate(sweeps[names[0]]):
        cells = []
        for n in names:
            x = sweeps[n][i]
            cells += [f"{_pct(x['pool_em'])} / {_pct(x['held_out_em'])}", _pct(x["widened"])]
        lines.append(f"| {line['uncertain_below']:g} | " + " | ".join(cells) + " |")
    return lines


def calibration_table(study: dict) -> list[str]:
    """Routing accuracy (and exact match where measured) per mix, probe and score variant."""
    cfg = study["config"]
    lines = [f"Calibrated routing: routing accuracy (%) and exact match (%) where measured. `input`: statistics "
             f"from a seeded sample of {cfg['input_sample']} of the evaluated prompts; `reference`: the "
             f"{cfg['reference_prompts']} shipped reference prompts. Skewed mix: {cfg['skew_rows']} prompts, "
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
