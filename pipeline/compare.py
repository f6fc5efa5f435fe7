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

Every number is computed from the data files the manifests list, read one file at a time, into
counters: nothing per row stays in memory. The confidence quantiles come from a histogram of
`QUANTILE_BINS` bins between the two runs' extremes (exact to a bin's width); the rows-by-id
comparison runs in buckets of about `ID_BUCKET_ROWS` ids (a 64-bit hash of the id picks the
bucket), each bucket's rows of both runs joined in Arrow, then dropped, so at most one bucket's
(id, adapters, weights) is held at once, whatever the runs' size.
"""

from __future__ import annotations

import heapq
import io
import json
import math
from collections import Counter

import numpy as np
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
QUANTILE_BINS = 2000
"""Bins of the finer grid the confidence quantiles are read from."""
ID_BUCKET_ROWS = 1_000_000
"""Rows of the larger run per bucket of the rows-by-id comparison."""


def _confidence_files(uri: str, storage_cfg: StorageConfig):
    """Each data file's finite confidence values (an Arrow array), or None for a file without the column."""
    manifest = committed_manifest_at(uri, storage_cfg)
    fs, root = storage.filesystem(uri, storage_cfg)
    for entry in manifest["output"]["files"]:
        if "confidence" not in pq.read_schema(f"{root}/{entry['path']}", filesystem=fs).names:
            yield None
            continue
        values = _read_data_file(fs, root, uri, entry, ["confidence"]).column("confidence").drop_null()
        values = values.cast(pa.float64())
        yield values.filter(pc.is_finite(values))


def _summary(uri: str, storage_cfg: StorageConfig) -> tuple[dict, dict | None]:
    """One run's counts (rows, errors, warnings, adapter selections) and its confidence moments
    (rows, sum, min, max; None without the column)."""
    manifest = committed_manifest_at(uri, storage_cfg)
    fs, root = storage.filesystem(uri, storage_cfg)
    rows = errors = warnings = routed = 0
    selections: Counter = Counter()
    for entry in manifest["output"]["files"]:
        table = _read_data_file(fs, root, uri, entry, ["adapters", "error", "warning"])
        rows += table.num_rows
        errors += table.num_rows - table.column("error").null_count
        warnings += table.num_rows - table.column("warning").null_count
        lengths = pc.list_value_length(table.column("adapters")).fill_null(0)
        routed += int(pc.sum(pc.greater(lengths, 0)).as_py() or 0)
        flat = pc.list_flatten(table.column("adapters"))
        for item in pc.value_counts(flat).to_pylist() if len(flat) else []:
            selections[item["values"]] += item["counts"]
    confidence: dict | None = {"rows": 0, "sum": 0.0, "min": math.inf, "max": -math.inf}
    for values in _confidence_files(uri, storage_cfg):
        if values is None:
            confidence = None
            break
        if len(values):
            bounds = pc.min_max(values)
            confidence = {"rows": confidence["rows"] + len(values), "sum": confidence["sum"] + pc.sum(values).as_py(),
                          "min": min(confidence["min"], bounds["min"].as_py()),
                          "max": max(confidence["max"], bounds["max"].as_py())}
    timings = manifest.get("timings", {})
    return {"output_uri": uri, "config_hash": manifest.get("config_hash"), "rows": rows, "errors": errors,
            "warnings": warnings, "routed": routed,
            "error_rate": round(errors / rows, 6) if rows else 0.0,
            "warning_rate": round(warnings / rows, 6) if rows else 0.0,
            "rows_per_second": timings.get("rows_per_second"), "seconds": timings.get("seconds"),
            "selections": dict(selections)}, confidence


def _histogram(uri: str, storage_cfg: StorageConfig, low: float, width: float, bins: int) -> list[int]:
    """Counts of the run's confidence values in `bins` bins of `width` from `low` (the last bin closed)."""
    counts = np.zeros(bins, dtype=np.int64)
    for values in _confidence_files(uri, storage_cfg):
        index = np.minimum(bins - 1, ((values.to_numpy(zero_copy_only=False) - low) / width).astype(np.int64))
        counts += np.bincount(np.maximum(index, 0), minlength=bins)
    return counts.tolist()


def _quantile(counts: list[int], low: float, width: float, q: float) -> float:
    """The q-quantile read from a histogram: the middle of the bin holding the value of rank
    round(q x (n - 1)) (0-based), as the sorted values would give it."""
    target, seen = int(q * (sum(counts) - 1) + 0.5), 0
    for i, c in enumerate(counts):
        seen += c
        if seen > target:
            return low + (i + 0.5) * width
    return low + (len(counts) - 0.5) * width


def _confidence(a_uri: str, b_uri: str, storage_cfg: StorageConfig, a: dict | None, b: dict | None) -> dict:
    if a is None or b is None:
        missing = [name for name, v in (("A", a), ("B", b)) if v is None]
        return {"present": False, "missing_in": missing}
    if not a["rows"] or not b["rows"]:
        return {"present": True, "rows": [a["rows"], b["rows"]], "histogram": None}
    low, high = min(a["min"], b["min"]), max(a["max"], b["max"])
    width = (high - low) / CONFIDENCE_BINS or 1.0
    fine = (high - low) / QUANTILE_BINS or 1.0
    ha, hb = (_histogram(u, storage_cfg, low, width, CONFIDENCE_BINS) for u in (a_uri, b_uri))
    gap, ca, cb = 0.0, 0, 0
    for x, y in zip(ha, hb):  # the largest gap between the CDFs on the common grid
        ca, cb = ca + x, cb + y
        gap = max(gap, abs(ca / a["rows"] - cb / b["rows"]))

    def stats(uri: str, moments: dict) -> dict:
        counts = _histogram(uri, storage_cfg, low, fine, QUANTILE_BINS)
        return {"rows": moments["rows"], "mean": round(moments["sum"] / moments["rows"], 6),
                **{f"p{int(q * 100)}": round(_quantile(counts, low, fine, q), 6) for q in (0.1, 0.5, 0.9)}}

    sa, sb = stats(a_uri, a), stats(b_uri, b)
    return {"present": True, "A": sa, "B": sb, "mean_shift": round(sb["mean"] - sa["mean"], 6),
            "max_cdf_gap": round(gap, 6), "edges": [round(low + i * width, 6) for i in range(CONFIDENCE_BINS + 1)],
            "histogram": {"A": ha, "B": hb}}


def _by_id(uri: str, storage_cfg: StorageConfig, bucket: int = 0, buckets: int = 1) -> pa.Table:
    """The run's rows without an error whose id falls in `bucket` of `buckets`: (id, adapters, weights)."""
    manifest = committed_manifest_at(uri, storage_cfg)
    fs, root = storage.filesystem(uri, storage_cfg)
    tables = []
    for entry in manifest["output"]["files"]:
        table = _read_data_file(fs, root, uri, entry, ["id", "adapters", "weights", "error"])
        table = table.filter(pc.is_null(table.column("error"))).drop_columns(["error"])
        if buckets > 1 and table.num_rows:
            from pipeline.ids import hash64

            table = table.filter(pa.array(hash64(table.column("id").cast(pa.string())) % buckets == bucket))
        tables.append(table)
    return pa.concat_tables(tables) if tables else pa.table({"id": [], "adapters": [], "weights": []})


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
    largest = max(sum(f["rows"] for f in committed_manifest_at(u, storage_cfg)["output"]["files"]) for u in (a_uri, b_uri))
    buckets = max(1, math.ceil(largest / ID_BUCKET_ROWS))
    moved: list = []  # the TOP rows that moved most so far
    same = changed = 0
    total = 0.0
    for bucket in range(buckets):
        a, b = _by_id(a_uri, storage_cfg, bucket, buckets), _by_id(b_uri, storage_cfg, bucket, buckets)
        keys = [pa.table({"id": t.column("id").cast(pa.string()), f"_{side}": pa.array(range(t.num_rows), pa.int64())})
                for side, t in (("a", a), ("b", b))]
        pairs = keys[0].join(keys[1], "id", join_type="inner")  # Arrow joins no list columns: join row numbers
        ia, ib = pairs.column("_a"), pairs.column("_b")
        columns = (pairs.column("id"), a.column("adapters").take(ia), a.column("weights").take(ia),
                   b.column("adapters").take(ib), b.column("weights").take(ib))
        here = []
        for row_id, na, wa, nb, wb in zip(*(c.to_pylist() for c in columns)):
            d = distance(na, wa, nb, wb)
            total += d
            changed += sorted(na) != sorted(nb)
            here.append((-d, str(row_id), na, wa, nb, wb))
        same += pairs.num_rows
        moved = heapq.nsmallest(TOP, moved + here, key=lambda r: (r[0], r[1]))
    if not same:
        return {"same_ids": 0, "why": "no id is in both runs"}
    return {"same_ids": same, "changed_adapters": changed,
            "mean_distance": round(total / same, 6),
            "most_changed": [{"id": i, "distance": round(-d, 6), "A": {"adapters": na, "weights": [round(w, 4) for w in wa]},
                              "B": {"adapters": nb, "weights": [round(w, 4) for w in wb]}}
                             for d, i, na, wa, nb, wb in moved]}


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
        "confidence": _confidence(a_uri, b_uri, storage_cfg, conf_a, conf_b),
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
