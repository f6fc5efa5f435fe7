"""The report of a committed run: `report.json`, `report.md` and PNG plots, beside its data.

    <output>/_report/report.json   every number below, recomputable from the data files
    <output>/_report/report.md     the same as tables, with the plots linked
    <output>/_report/*.png         adapters.png, top_weight.png, throughput.png, errors.png,
                                   tokens.png, groups.png
    <output>/.huggingface.yaml     tells `datasets.load_dataset(OUTPUT)` that the rows are data/*.parquet

Parquet readers skip names that start with `_` or `.`, so `pyarrow.parquet.read_table(OUTPUT)`,
`pyarrow.dataset.dataset(OUTPUT)` and `ray.data.read_parquet(OUTPUT)` read exactly the committed
rows; `datasets.load_dataset(OUTPUT)` follows `.huggingface.yaml` to them.

Everything is computed from the files `_manifest.json` lists, one file at a time, into counters
whose size depends on the pool and the token lengths, never on the number of rows:

- adapter selection counts (rows that selected it) and mean weight (over those rows);
- the distribution of each row's top weight (in steps of 0.01);
- rows/s over time: each data file's write time (its modification time) against the start of the
  attempt that wrote it (the attempt id is its start time);
- error rows by reason (`outputs.error_reason`: numbers blanked);
- prompt and output token histograms (rows without an error);
- batching as the actors measured it (generation batches, groups, mean unions, adapter loads and
  evictions, peak resident), summed from the data files' records;
- group union sizes: for every batch of `resources.batch_size` rows of a data file (consecutive, or
  in the actor's selection order when `generation.ordering` is selection), the
  union of its selections (what the batch reads: every generate call mixes its rows at once), and,
  for runs of earlier versions that recorded grouping settings, `actors.grouping` replayed with them
  on an even sample of at most `REPLAY_BATCHES` batches (the decode groups such an actor formed; the
  output holds selections, not the groups).
"""

from __future__ import annotations

import calendar
import io
import json
import math
import time
from collections import Counter
from dataclasses import dataclass, field

import pyarrow.parquet as pq

from actors import grouping
from pipeline import storage
from pipeline.config import StorageConfig
from pipeline.errors import OutputError
from pipeline.outputs import MANIFEST, SUCCESS, attempt_of, count_warnings, error_reason

PLOT_DIR = "_report"
"""Folder of the report's files at the output (skipped by Parquet readers)."""
REPORT_JSON = f"{PLOT_DIR}/report.json"
REPORT_MD = f"{PLOT_DIR}/report.md"
LEGACY = ("report.json", "report.md", "report")
"""Where versions before `_report/` wrote the report (removed when the report is rewritten)."""
DATASET_CARD = ".huggingface.yaml"
DATASET_CARD_TEXT = ("# datasets.load_dataset(OUTPUT) reads the committed rows: the data files, not the report\n"
                     "configs:\n- config_name: default\n  data_files:\n  - split: train\n"
                     "    path: data/*.parquet\n")
TOP_WEIGHT_STEP = 0.01
"""Width of the top-weight histogram's bins."""
REPLAY_BATCHES = 2000
"""Most batches whose grouping is replayed (an even sample; the replay costs about 1 ms a batch)."""
_COLUMNS = ["adapters", "weights", "error", "prompt_tokens", "output_tokens"]
# grouping settings for manifests that lack them: runs of the slot engine record none, and mix all
# rows of a generate call at once (one group); earlier runs recorded theirs
_GROUPING_DEFAULTS = {"grouping": False, "max_groups": 8, "group_overhead": 8.0, "decode_union_cost": 8.0,
                      "ordering": "input"}  # runs that record no ordering batched in input order


@dataclass
class Tally:
    """Counters over a run's rows, filled one data file at a time."""

    rows: int = 0
    errors: int = 0
    warnings: int = 0
    selections: Counter = field(default_factory=Counter)  # adapter -> rows that selected it
    weight_sums: Counter = field(default_factory=Counter)  # adapter -> sum of its weights over those rows
    top_weight: Counter = field(default_factory=Counter)  # bin index (top weight / step) -> rows
    error_reasons: Counter = field(default_factory=Counter)
    warning_reasons: Counter = field(default_factory=Counter)  # kind -> rows (a row with two kinds counts twice)
    prompt_tokens: Counter = field(default_factory=Counter)  # tokens -> rows (rows without an error)
    output_tokens: Counter = field(default_factory=Counter)
    batch_unions: Counter = field(default_factory=Counter)  # union size of a whole batch -> batches
    batches: int = 0  # batches seen (for the replay's sample)
    union_sizes: Counter = field(default_factory=Counter)  # decode-group union size -> groups (replayed)
    group_rows: Counter = field(default_factory=Counter)  # decode-group union size -> rows in such groups


def grouping_settings(config: dict) -> dict:
    """The job's grouping settings from the manifest's configuration, wherever its sections hold them."""
    out = dict(_GROUPING_DEFAULTS)
    for section in ("routing", "generation"):
        for key in out:
            if key in config.get(section, {}):
                out[key] = config[section][key]
    return out


def _replay_groups(selections: list[list[str]], batch_size: int, settings: dict, stride: int, tally: Tally) -> None:
    index: dict[str, int] = {}
    for start in range(0, len(selections), batch_size):
        batch = [[index.setdefault(a, len(index)) for a in names] for names in selections[start:start + batch_size]]
        tally.batch_unions[len(set().union(*map(set, batch)))] += 1
        tally.batches += 1
        if (tally.batches - 1) % stride:
            continue
        if settings["grouping"]:
            groups = grouping.group_rows(batch, int(settings["max_groups"]), float(settings["group_overhead"]),
                                         float(settings["decode_union_cost"]))
        else:
            groups = grouping.single_group(batch)
        for group in groups:
            tally.union_sizes[len(group.union)] += 1
            tally.group_rows[len(group.union)] += len(group.rows)


def tally_file(table, batch_size: int, settings: dict, tally: Tally, stride: int = 1) -> None:
    """Add one data file's rows (a pyarrow table with `_COLUMNS`) to the counters."""
    selected = []
    for names, weights, error, prompt, output in zip(*(table.column(c).to_pylist() for c in _COLUMNS)):
        tally.rows += 1
        if error is not None:
            tally.errors += 1
            tally.error_reasons[error_reason(error)] += 1
            continue
        tally.prompt_tokens[int(prompt)] += 1
        tally.output_tokens[int(output)] += 1
        if names:
            for name, weight in zip(names, weights):
                tally.selections[name] += 1
                tally.weight_sums[name] += float(weight)
            tally.top_weight[min(int(max(weights) / TOP_WEIGHT_STEP + 1e-6), round(1 / TOP_WEIGHT_STEP))] += 1
            selected.append((names, int(prompt)))
    if settings["ordering"] == "selection":  # as the actor ordered the block this file holds
        selected.sort(key=lambda pair: (tuple(pair[0]), pair[1]))
    selected = [names for names, _ in selected]
    _replay_groups(selected, batch_size, settings, stride, tally)


def _stats(hist: Counter) -> dict:
    """Count, mean, quantiles and the histogram (value -> rows) of an integer histogram."""
    n = sum(hist.values())
    if n == 0:
        return {"rows": 0, "mean": None, "p50": None, "p90": None, "p99": None, "max": None, "histogram": {}}
    values = sorted(hist)

    def quantile(q: float) -> int:
        seen, rank = 0, q * (n - 1)
        for v in values:
            seen += hist[v]
            if seen > rank:
                return v
        return values[-1]

    return {"rows": n, "mean": round(sum(v * c for v, c in hist.items()) / n, 3), "p50": quantile(0.5),
            "p90": quantile(0.9), "p99": quantile(0.99), "max": values[-1],
            "histogram": {str(v): hist[v] for v in values}}


def _attempt_start(attempt: str) -> float:
    return float(calendar.timegm(time.strptime(attempt.split("-")[0], "%Y%m%dT%H%M%SZ")))


def throughput(files: list[dict], mtimes: list[float]) -> list[dict]:
    """Per attempt: (seconds since its start, rows written so far) after each of its files."""
    out: dict[str, dict] = {}
    for entry, mtime in sorted(zip(files, mtimes), key=lambda pair: pair[1]):
        attempt = entry.get("attempt") or attempt_of(entry["path"].rsplit("/", 1)[-1])
        record = out.setdefault(attempt, {"attempt": attempt, "points": [], "rows": 0})
        record["rows"] += entry["rows"]
        record["points"].append([round(max(mtime - _attempt_start(attempt), 0.0), 3), record["rows"]])
    for record in out.values():
        last = record["points"][-1][0]
        record["rows_per_second"] = round(record["rows"] / last, 3) if last > 0 else None
    return sorted(out.values(), key=lambda r: r["attempt"])


REPAIR = (f"delete {SUCCESS} there and rerun the job (logo-batch run, same configuration): it checks the data files, "
          "computes the rows that no readable file holds, and commits again")


def committed_manifest_at(output_uri: str, storage_cfg: StorageConfig) -> dict:
    """The manifest of the committed run at `output_uri`; raises OutputError saying what is wrong
    (no `_SUCCESS`, a missing or unreadable manifest) and the fix."""
    if storage.read_bytes(storage.join(output_uri, SUCCESS), storage_cfg) is None:
        raise OutputError(f"{output_uri}: no {SUCCESS} marker; the run is not committed: run the job (logo-batch run) "
                          "to finish it, then report it")
    uri = storage.join(output_uri, MANIFEST)
    data = storage.read_bytes(uri, storage_cfg)
    try:
        manifest = None if data is None else json.loads(data)
    except (ValueError, UnicodeDecodeError) as err:
        raise OutputError(f"{uri}: not valid JSON ({err}); the output is damaged: {REPAIR}") from None
    if manifest is None:
        raise OutputError(f"{uri}: missing, though {SUCCESS} is there; the output is damaged: {REPAIR}")
    files = manifest.get("output", {}).get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, list) or not all(isinstance(f, dict) and "path" in f and "rows" in f for f in files):
        raise OutputError(f"{uri}: lists no data files (no output.files of paths and rows); the output is damaged: "
                          f"{REPAIR}")
    return manifest


def _read_data_file(fs, root: str, output_uri: str, entry: dict, columns: list[str]):
    uri = storage.join(output_uri, entry["path"])
    try:
        return pq.read_table(f"{root}/{entry['path']}", filesystem=fs, columns=columns)
    except FileNotFoundError:
        raise OutputError(f"{uri}: listed in {MANIFEST} but missing; the output is damaged: {REPAIR}") from None
    except (OSError, ValueError) as err:  # pyarrow: ArrowInvalid (a ValueError) or an IO error
        raise OutputError(f"{uri}: cannot be read as Parquet ({' '.join(str(err).split())}); the output is "
                          f"damaged: {REPAIR}") from None


def compute_run_report(output_uri: str, storage_cfg: StorageConfig) -> dict:
    """The report's numbers for the committed run at `output_uri` (reads its data files once)."""
    manifest = committed_manifest_at(output_uri, storage_cfg)
    config = manifest.get("config", {})
    batch_size = int(config.get("resources", {}).get("batch_size", 16))
    settings = grouping_settings(config)
    fs, root = storage.filesystem(output_uri, storage_cfg)
    files = manifest["output"]["files"]
    tally = Tally()
    stride = max(1, math.ceil(sum(math.ceil(f["rows"] / batch_size) for f in files) / REPLAY_BATCHES))
    for entry in files:
        table = _read_data_file(fs, root, output_uri, entry, [*_COLUMNS, "warning"])
        tally.warnings += table.num_rows - table.column("warning").null_count
        tally.warning_reasons.update(count_warnings(table.column("warning")))
        tally_file(table, batch_size, settings, tally, stride)
    mtimes = [info.mtime.timestamp() if info.mtime else 0.0
              for info in fs.get_file_info([f"{root}/{f['path']}" for f in files])]
    adapters = [{"adapter": name, "rows": count, "mean_weight": round(tally.weight_sums[name] / count, 6)}
                for name, count in sorted(tally.selections.items(), key=lambda kv: (-kv[1], kv[0]))]
    steps = round(1 / TOP_WEIGHT_STEP)
    return {
        "output_uri": output_uri,
        "config_hash": manifest.get("config_hash"),
        "rows": tally.rows, "errors": tally.errors, "warnings": tally.warnings,
        "files": len(files),
        "seconds": manifest.get("timings", {}).get("seconds"),
        "rows_per_second": manifest.get("timings", {}).get("rows_per_second"),
        "adapters": adapters,
        "top_weight": {"step": TOP_WEIGHT_STEP, "rows": sum(tally.top_weight.values()),
                       "histogram": {f"{b / steps:.2f}": tally.top_weight[b] for b in sorted(tally.top_weight)}},
        "throughput": throughput(files, mtimes),
        "errors_by_reason": dict(sorted(tally.error_reasons.items(), key=lambda kv: (-kv[1], kv[0]))),
        "warnings_by_reason": dict(sorted(tally.warning_reasons.items(), key=lambda kv: (-kv[1], kv[0]))),
        "prompt_tokens": _stats(tally.prompt_tokens),
        "output_tokens": _stats(tally.output_tokens),
        "batching": manifest.get("batching") or manifest.get("report", {}).get("batching", {}),
        "groups": {"batch_size": batch_size, **settings, "batches": tally.batches,
                   "batch_union_size": _stats(tally.batch_unions),
                   "replayed_batches": len(range(0, tally.batches, stride)),
                   "groups": sum(tally.union_sizes.values()), "union_size": _stats(tally.union_sizes),
                   "rows_by_union_size": {str(k): tally.group_rows[k] for k in sorted(tally.group_rows)}},
    }


def write_run_report(output_uri: str, storage_cfg: StorageConfig) -> dict:
    """Compute the report of the committed run at `output_uri` and write it beside the run."""
    from pipeline.run_report_plots import PLOTS, markdown

    report = compute_run_report(output_uri, storage_cfg)
    for name, draw in PLOTS.items():
        buffer = io.BytesIO()
        draw(report).savefig(buffer, format="png", dpi=100)
        storage.write_bytes(storage.join(output_uri, PLOT_DIR, f"{name}.png"), buffer.getvalue(), storage_cfg)
    storage.write_bytes(storage.join(output_uri, REPORT_JSON), json.dumps(report, indent=1).encode(), storage_cfg)
    storage.write_bytes(storage.join(output_uri, REPORT_MD), markdown(report).encode(), storage_cfg)
    storage.write_bytes(storage.join(output_uri, DATASET_CARD), DATASET_CARD_TEXT.encode(), storage_cfg)
    for name in LEGACY[:2]:  # an older version's report would stop Parquet readers of the folder
        storage.delete(storage.join(output_uri, name), storage_cfg)
    storage.delete_prefix(storage.join(output_uri, LEGACY[2]), storage_cfg)
    return report
