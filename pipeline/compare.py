"""Two committed runs side by side (`logo-batch report --compare A B`, and every nightly run
against the previous committed night of its job file): what shifted from A to B.

    adapters     each adapter's share of the routed rows (rows that selected it / rows with a
                 routing) in A and in B, and the change; adapters chosen in one run only are named
    confidence   the `confidence` column's distribution in each run (mean, quantiles, histogram on
                 a common grid) and the largest gap between their CDFs; said to be absent when a
                 run has no such column
    rates        error and warning rows per row, and rows/s (the manifests' timings), B against A
    routing      when rows of the same id are in both runs: how many, how many changed adapters,
                 and the rows whose routing moved most (total variation between the two weight
                 vectors: 0 the same mixture, 1 no adapter in common)

Every number is computed from the data files the manifests list, read one file at a time; only
the rows-by-id comparison holds the two runs' (id, adapters, weights) columns, in Arrow.
"""

from __future__ import annotations

import io
import json
import math
from collections import Counter

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.config import StorageConfig
from pipeline.run_report import PLOT_DIR, _read_data_file, committed_manifest_at

COMPARE_JSON = f"{PLOT_DIR}/compare.json"
COMPARE_MD = f"{PLOT_DIR}/compare.md"
COMPARE_PNG = f"{PLOT_DIR}/compare.png"
TOP = 20
"""Adapters and rows listed."""
CONFIDENCE_BINS = 20
"""Bins of the common confidence grid."""


def _summary(uri: str, storage_cfg: StorageConfig) -> tuple[dict, list[float] | None]:
    """One run's counts (rows, errors, warnings, adapter selections) and its confidence values
    (None without the column)."""
    manifest = committed_manifest_at(uri, storage_cfg)
    fs, root = storage.filesystem(uri, storage_cfg)
    rows = errors = warnings = routed = 0
    selections: Counter = Counter()
    confidence: list[float] | None = []
    for entry in manifest["output"]["files"]:
        schema = pq.read_schema(f"{root}/{entry['path']}", filesystem=fs)
        columns = ["adapters", "error", "warning"] + (["confidence"] if "confidence" in schema.names else [])
        if "confidence" not in schema.names:
            confidence = None
        table = _read_data_file(fs, root, uri, entry, columns)
        rows += table.num_rows
        errors += table.num_rows - table.column("error").null_count
        warnings += table.num_rows - table.column("warning").null_count
        lengths = pc.list_value_length(table.column("adapters")).fill_null(0)
        routed += int(pc.sum(pc.greater(lengths, 0)).as_py() or 0)
        flat = pc.list_flatten(table.column("adapters"))
        for item in pc.value_counts(flat).to_pylist() if len(flat) else []:
            selections[item["values"]] += item["counts"]
        if confidence is not None:
            confidence += [float(v) for v in table.column("confidence").drop_null().to_pylist()
                           if v is not None and math.isfinite(float(v))]
    timings = manifest.get("timings", {})
    return {"output_uri": uri, "config_hash": manifest.get("config_hash"), "rows": rows, "errors": errors,
            "warnings": warnings, "routed": routed,
            "error_rate": round(errors / rows, 6) if rows else 0.0,
            "warning_rate": round(warnings / rows, 6) if rows else 0.0,
            "rows_per_second": timings.get("rows_per_second"), "seconds": timings.get("seconds"),
            "selections": dict(selections)}, confidence


def _quantile(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * (len(values) - 1) + 0.5))]


def _confidence(a: list[float] | None, b: list[float] | None) -> dict:
    if a is None or b is None:
        missing = [name for name, v in (("A", a), ("B", b)) if v is None]
        return {"present": False, "missing_in": missing}
    if not a or not b:
        return {"present": True, "rows": [len(a), len(b)], "histogram": None}
    a, b = sorted(a), sorted(b)
    low, high = min(a[0], b[0]), max(a[-1], b[-1])
    width = (high - low) / CONFIDENCE_BINS or 1.0

    def hist(values: list[float]) -> list[int]:
        counts = [0] * CONFIDENCE_BINS
        for v in values:
            counts[min(CONFIDENCE_BINS - 1, int((v - low) / width))] += 1
        return counts

    ha, hb = hist(a), hist(b)
    gap, ca, cb = 0.0, 0, 0
    for x, y in zip(ha, hb):  # the largest gap between the CDFs on the common grid
        ca, cb = ca + x, cb + y
        gap = max(gap, abs(ca / len(a) - cb / len(b)))

    def stats(values: list[float]) -> dict:
        return {"rows": len(values), "mean": round(sum(values) / len(values), 6),
                **{f"p{int(q * 100)}": round(_quantile(values, q), 6) for q in (0.1, 0.5, 0.9)}}

    return {"present": True, "A": stats(a), "B": stats(b), "mean_shift": round(stats(b)["mean"] - stats(a)["mean"], 6),
            "max_cdf_gap": round(gap, 6), "edges": [round(low + i * width, 6) for i in range(CONFIDENCE_BINS + 1)],
            "histogram": {"A": ha, "B": hb}}


def _by_id(uri: str, storage_cfg: StorageConfig) -> pa.Table:
    manifest = committed_manifest_at(uri, storage_cfg)
    fs, root = storage.filesystem(uri, storage_cfg)
    tables = [_read_data_file(fs, root, uri, entry, ["id", "adapters", "weights", "error"])
              for entry in manifest["output"]["files"]]
    table = pa.concat_tables(tables) if tables else pa.table({"id": [], "adapters": [], "weights": [], "error": []})
    return table.filter(pc.is_null(table.column("error"))).drop_columns(["error"])


def distance(names_a: list[str], weights_a: list[float], names_b: list[str], weights_b: list[float]) -> float:
    """Total variation between two routings' weight vectors (each summing to 1): half the L1 distance."""
    wa, wb = dict(zip(names_a, weights_a)), dict(zip(names_b, weights_b))
    return 0.5 * sum(abs(wa.get(k, 0.0) - wb.get(k, 0.0)) for k in set(wa) | set(wb))


def comparable_ids(a_uri: str, b_uri: str, storage_cfg: StorageConfig) -> bool:
    """Rows of A and B are matched by id when both runs read an id column, or both read the same
    input files (then the generated ids, file and row, name the same prompts)."""
    ma, mb = committed_manifest_at(a_uri, storage_cfg), committed_manifest_at(b_uri, storage_cfg)
    columns = [m.get("config", {}).get("input", {}).get("id_column") for m in (ma, mb)]
    if all(columns):
        return True
    return ma.get("input", {}).get("files") == mb.get("input", {}).get("files")


def _routing(a_uri: str, b_uri: str, storage_cfg: StorageConfig) -> dict:
    if not comparable_ids(a_uri, b_uri, storage_cfg):
        return {"same_ids": 0, "why": "the runs have no id column and read different input files"}
    a, b = _by_id(a_uri, storage_cfg), _by_id(b_uri, storage_cfg)
    keys = [pa.table({"id": t.column("id").cast(pa.string()), f"_{side}": pa.array(range(t.num_rows), pa.int64())})
            for side, t in (("a", a), ("b", b))]
    pairs = keys[0].join(keys[1], "id", join_type="inner")  # Arrow joins no list columns: join row numbers
    if not pairs.num_rows:
        return {"same_ids": 0, "why": "no id is in both runs"}
    ia, ib = pairs.column("_a"), pairs.column("_b")
    joined = pa.table({"id": pairs.column("id"),
                       "adapters_a": a.column("adapters").take(ia), "weights_a": a.column("weights").take(ia),
                       "adapters_b": b.column("adapters").take(ib), "weights_b": b.column("weights").take(ib)})
    moved, changed, total = [], 0, 0.0
    for row_id, na, wa, nb, wb in zip(*(joined.column(c).to_pylist()
                                        for c in ("id", "adapters_a", "weights_a", "adapters_b", "weights_b"))):
        d = distance(na, wa, nb, wb)
        total += d
        if sorted(na) != sorted(nb):
            changed += 1
        moved.append((d, str(row_id), na, [round(w, 4) for w in wa], nb, [round(w, 4) for w in wb]))
    moved.sort(key=lambda r: (-r[0], r[1]))
    return {"same_ids": joined.num_rows, "changed_adapters": changed,
            "mean_distance": round(total / joined.num_rows, 6),
            "most_changed": [{"id": i, "distance": round(d, 6), "A": {"adapters": na, "weights": wa},
                              "B": {"adapters": nb, "weights": wb}} for d, i, na, wa, nb, wb in moved[:TOP]]}


def compare_runs(a_uri: str, b_uri: str, storage_cfg: StorageConfig) -> dict:
    """The comparison of committed run B (the newer) against A (see the module docstring)."""
    a, conf_a = _summary(a_uri, storage_cfg)
    b, conf_b = _summary(b_uri, storage_cfg)
    names = set(a["selections"]) | set(b["selections"])
    adapters = []
    for name in names:
        sa = a["selections"].get(name, 0) / a["routed"] if a["routed"] else 0.0
        sb = b["selections"].get(name, 0) / b["routed"] if b["routed"] else 0.0
        adapters.append({"adapter": name, "share_a": round(sa, 6), "share_b": round(sb, 6),
                         "change": round(sb - sa, 6)})
    adapters.sort(key=lambda r: (-abs(r["change"]), r["adapter"]))
    ratio = (round(b["rows_per_second"] / a["rows_per_second"], 3)
             if a["rows_per_second"] and b["rows_per_second"] else None)
    return {
        "A": {k: v for k, v in a.items() if k != "selections"},
        "B": {k: v for k, v in b.items() if k != "selections"},
        "adapters": adapters,
        "stopped": sorted(n for n in names if a["selections"].get(n) and not b["selections"].get(n)),
        "started": sorted(n for n in names if b["selections"].get(n) and not a["selections"].get(n)),
        "confidence": _confidence(conf_a, conf_b),
        "rates": {"error_rate_change": round(b["error_rate"] - a["error_rate"], 6),
                  "warning_rate_change": round(b["warning_rate"] - a["warning_rate"], 6),
                  "rows_per_second_ratio": ratio},
        "routing": _routing(a_uri, b_uri, storage_cfg),
    }


def markdown(cmp: dict, heading: str = "#") -> str:
    """The comparison as Markdown (`heading`: the level of its title, `##` inside a run report)."""
    a, b, rates, routing = cmp["A"], cmp["B"], cmp["rates"], cmp["routing"]
    pct = lambda x: f"{100 * x:.2f}%"  # noqa: E731
    lines = [f"{heading} Compared with {a['output_uri']}", "",
             f"A = {a['output_uri']} ({a['rows']} rows), B = {b['output_uri']} ({b['rows']} rows).", "",
             f"![comparison]({COMPARE_PNG.rsplit('/', 1)[-1]})", "",
             "| | A | B | change |", "|---|---:|---:|---:|",
             f"| error rows | {pct(a['error_rate'])} | {pct(b['error_rate'])} | {pct(rates['error_rate_change'])} |",
             f"| warning rows | {pct(a['warning_rate'])} | {pct(b['warning_rate'])} | "
             f"{pct(rates['warning_rate_change'])} |",
             f"| rows/s | {a['rows_per_second']} | {b['rows_per_second']} | "
             + (f"x{rates['rows_per_second_ratio']} |" if rates["rows_per_second_ratio"] else "|"), ""]
    if cmp["stopped"]:
        lines += [f"Chosen in A, never in B: {', '.join(cmp['stopped'])}.", ""]
    if cmp["started"]:
        lines += [f"Chosen in B, never in A: {', '.join(cmp['started'])}.", ""]
    lines += ["Adapter share of the routed rows (largest changes first):", "",
              "| adapter | A | B | change |", "|---|---:|---:|---:|",
              *(f"| {r['adapter']} | {pct(r['share_a'])} | {pct(r['share_b'])} | {pct(r['change'])} |"
                for r in cmp["adapters"][:TOP]), ""]
    c = cmp["confidence"]
    if not c["present"]:
        lines += [f"Confidence: no `confidence` column in run {' and '.join(c['missing_in'])}.", ""]
    elif c.get("histogram") is None:
        lines += ["Confidence: no rows with a confidence value in one of the runs.", ""]
    else:
        lines += ["| confidence | rows | mean | p10 | p50 | p90 |", "|---|---:|---:|---:|---:|---:|",
                  *(f"| {k} | {c[k]['rows']} | {c[k]['mean']} | {c[k]['p10']} | {c[k]['p50']} | {c[k]['p90']} |"
                    for k in ("A", "B")),
                  "", f"Mean shift {c['mean_shift']:+}; largest gap between the distributions (CDF) "
                  f"{c['max_cdf_gap']}.", ""]
    if not routing["same_ids"]:
        lines += [f"No row-by-row routing comparison: {routing.get('why', 'no id is in both runs')}.", ""]
    else:
        lines += [f"Rows of the same id in both: {routing['same_ids']}; with other adapters in B: "
                  f"{routing['changed_adapters']}; mean routing change (total variation) {routing['mean_distance']}.",
                  "", "| id | change | A | B |", "|---|---:|---|---|",
                  *(f"| {r['id']} | {r['distance']:.3f} | {_mix(r['A'])} | {_mix(r['B'])} |"
                    for r in routing["most_changed"][:TOP]), ""]
    return "\n".join(lines)


def _mix(routing: dict) -> str:
    return ", ".join(f"{n} {w:.2f}" for n, w in zip(routing["adapters"], routing["weights"]))


def plot(cmp: dict):
    """Adapter shares side by side (largest changes), and the confidence histograms (or the error
    and warning rates when a run has no confidence)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    shown = cmp["adapters"][:TOP]
    if shown:
        y = range(len(shown))
        left.barh([i - 0.2 for i in y], [r["share_a"] for r in shown], height=0.4, label="A")
        left.barh([i + 0.2 for i in y], [r["share_b"] for r in shown], height=0.4, label="B")
        left.set_yticks(list(y), [r["adapter"] for r in shown], fontsize="small")
        left.invert_yaxis()
        left.legend()
    left.set_xlabel("share of routed rows that selected it")
    left.set_title("adapter use, largest changes first")
    c = cmp["confidence"]
    if c["present"] and c.get("histogram"):
        edges = c["edges"]
        for key in ("A", "B"):
            total = sum(c["histogram"][key]) or 1
            right.stairs([v / total for v in c["histogram"][key]], edges, label=key)
        right.set_xlabel("confidence")
        right.set_ylabel("share of rows")
        right.set_title(f"confidence (largest CDF gap {c['max_cdf_gap']})")
        right.legend()
    else:
        a, b = cmp["A"], cmp["B"]
        right.bar([0, 1, 3, 4], [a["error_rate"], b["error_rate"], a["warning_rate"], b["warning_rate"]],
                  color=["tab:blue", "tab:orange"] * 2)
        right.set_xticks([0, 1, 3, 4], ["errors A", "errors B", "warnings A", "warnings B"])
        right.set_ylabel("share of rows")
        right.set_title("error and warning rows (no confidence column)")
    fig.tight_layout()
    plt.close(fig)
    return fig


def write_comparison(a_uri: str, b_uri: str, storage_cfg: StorageConfig) -> dict:
    """Compare and write `_report/compare.{json,md,png}` beside run B."""
    cmp = compare_runs(a_uri, b_uri, storage_cfg)
    buffer = io.BytesIO()
    plot(cmp).savefig(buffer, format="png", dpi=100)
    storage.write_bytes(storage.join(b_uri, COMPARE_PNG), buffer.getvalue(), storage_cfg)
    storage.write_bytes(storage.join(b_uri, COMPARE_JSON), json.dumps(cmp, indent=1).encode(), storage_cfg)
    storage.write_bytes(storage.join(b_uri, COMPARE_MD), markdown(cmp).encode(), storage_cfg)
    return cmp


def append_to_report(b_uri: str, cmp: dict, storage_cfg: StorageConfig) -> None:
    """Add the comparison as a section of run B's `report.md` (a nightly run's report)."""
    from pipeline.run_report import REPORT_MD

    uri = storage.join(b_uri, REPORT_MD)
    text = (storage.read_bytes(uri, storage_cfg) or b"").decode()
    text = text.split("\n## Compared with ", 1)[0].rstrip("\n")
    storage.write_bytes(uri, (text + "\n\n" + markdown(cmp, heading="##")).encode(), storage_cfg)
