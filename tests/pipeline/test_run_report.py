"""The report beside a committed run: its numbers recomputed from the Parquet files, valid PNGs,
and `logo-batch report` redrawing it (or refusing an output that is not committed)."""

from __future__ import annotations

import json
import math
import re
from collections import Counter

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from jobs.cli import main
from pipeline import run_job
from pipeline.run_report import PLOT_DIR, REPORT_JSON, REPORT_MD
from pipeline.run_report_plots import PLOTS
from tests.pipeline.conftest import ADAPTERS, job, prompt

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def committed(ray_runtime, tiny_assets, tmp_path_factory):
    model, pool = tiny_assets
    root = tmp_path_factory.mktemp("report")
    (root / "in").mkdir()
    prompts = [prompt(i) for i in range(30)]
    prompts[3] = ""  # an error row
    prompts[17] = None  # another, of another kind
    prompts[21] = "x" * 600  # truncated to the tiny model's context: a warning row
    pq.write_table(pa.table({"prompt": pa.array(prompts, pa.string())}), root / "in" / "p.parquet")
    config = job(model, pool, str(root / "in"), str(root / "out"), resources={"rows_per_block": 8},
                 run={"max_error_fraction": 0.1})  # 2 of 30 rows fail, and the run commits
    run_job(config, progress=False)
    return root / "out"


def test_report_numbers_are_those_of_the_parquet_files(committed):
    report = json.loads((committed / REPORT_JSON).read_text())
    table = pads.dataset(str(committed / "data"), format="parquet").to_table()
    rows = table.to_pylist()
    ok = [r for r in rows if r["error"] is None]
    assert report["rows"] == len(rows) == 30 and report["errors"] == 2 == len(rows) - len(ok)
    counts, sums = Counter(), Counter()
    for r in ok:
        for name, weight in zip(r["adapters"], r["weights"]):
            counts[name] += 1
            sums[name] += weight
    assert {a["adapter"]: a["rows"] for a in report["adapters"]} == dict(counts)
    assert set(counts) <= set(ADAPTERS) and sum(counts.values()) == 2 * len(ok)  # k = 2
    for a in report["adapters"]:
        assert math.isclose(a["mean_weight"], sums[a["adapter"]] / counts[a["adapter"]], rel_tol=1e-5)
    tops = Counter(f"{math.floor(max(r['weights']) * 100 + 1e-6) / 100:.2f}" for r in ok)
    assert report["top_weight"]["histogram"] == dict(tops)
    assert sum(report["errors_by_reason"].values()) == 2 and len(report["errors_by_reason"]) == 2
    warned = [r["warning"] for r in rows if r["warning"] is not None]
    assert warned and report["warnings"] == len(warned)
    kinds = Counter(kind for w in warned for kind in {re.sub(r"\d+", "N", note) for note in w.split("; ")})
    assert report["warnings_by_reason"] == dict(kinds), "warning rows by reason, from the data files"
    assert kinds["prompt truncated from the left: N -> N tokens"] == 1
    assert "| prompt truncated from the left: N -> N tokens | 1 |" in (committed / REPORT_MD).read_text()
    for column in ("prompt_tokens", "output_tokens"):
        hist = Counter(str(r[column]) for r in ok)
        assert report[column]["histogram"] == dict(hist)
        assert report[column]["max"] == max(r[column] for r in ok)
        assert report[column]["mean"] == round(sum(r[column] for r in ok) / len(ok), 3)
    groups = report["groups"]
    unions = Counter()
    for entry in json.loads((committed / "_manifest.json").read_text())["output"]["files"]:
        selected = [(r["adapters"], r["prompt_tokens"]) for r in pq.read_table(committed / entry["path"]).to_pylist()
                    if r["error"] is None]
        if groups["ordering"] == "selection":  # the actor's order inside the block this file holds
            selected.sort(key=lambda pair: (tuple(pair[0]), pair[1]))
        selected = [names for names, _ in selected]
        for start in range(0, len(selected), groups["batch_size"]):
            unions[str(len(set().union(*selected[start:start + groups["batch_size"]])))] += 1
    assert groups["batch_union_size"]["histogram"] == dict(unions)
    assert groups["replayed_batches"] == groups["batches"] == sum(unions.values())  # few: all replayed
    assert sum(groups["rows_by_union_size"].values()) == len(ok)
    sizes = [int(s) for s in groups["union_size"]["histogram"]]
    assert min(sizes) >= 2 and max(sizes) <= len(ADAPTERS)
    assert sum(t["rows"] for t in report["throughput"]) == 30
    measured = report["batching"]  # what the actors recorded: every batch, no adapter read twice
    files = json.loads((committed / "_manifest.json").read_text())["output"]["files"]
    assert measured["batches"] >= len(files) and measured["decode_groups"] >= measured["batches"]
    assert measured["loads"] == 0 and measured["peak_resident"] == len(ADAPTERS)
    assert 1 <= measured["mean_decode_union"] <= len(ADAPTERS)
    for record in report["throughput"]:
        assert [p[1] for p in record["points"]] == sorted(p[1] for p in record["points"])


def test_parquet_readers_and_datasets_read_the_output_folder_to_exactly_its_rows(committed, tmp_path):
    import datasets

    manifest = json.loads((committed / "_manifest.json").read_text())
    rows = pq.read_table(committed)  # the report's files, markers and manifest are all skipped
    assert rows.num_rows == manifest["output"]["rows"] == 30
    assert pads.dataset(str(committed), format="parquet").count_rows() == 30
    # a cache of its own: datasets' shared cache can hold an earlier run's folder of the same path
    loaded = datasets.load_dataset(str(committed), split="train", cache_dir=str(tmp_path / "hf-cache"))
    assert len(loaded) == 30 and "output" in loaded.column_names and "image" not in loaded.column_names
    assert sorted(map(str, loaded["output"])) == sorted(map(str, rows.column("output").to_pylist()))
    assert (committed / PLOT_DIR / "tokens.png").is_file(), "the report is there, where readers skip it"


def test_pngs_are_valid_images_and_markdown_links_them(committed):
    import matplotlib.image

    markdown = (committed / REPORT_MD).read_text()
    for name in PLOTS:
        path = committed / PLOT_DIR / f"{name}.png"
        assert path.read_bytes()[:8] == PNG
        height, width, _ = matplotlib.image.imread(path).shape
        assert height > 100 and width > 100
        assert f"]({name}.png)" in markdown and (committed / REPORT_MD).parent == path.parent


def test_report_command_redraws_and_refuses_uncommitted(committed, tmp_path, capsys):
    (committed / REPORT_JSON).unlink()
    assert main(["report", str(committed)]) == 0
    assert json.loads((committed / REPORT_JSON).read_text())["rows"] == 30
    assert f"{committed}/{REPORT_MD}" in capsys.readouterr().out
    assert main(["report", str(tmp_path)]) == 2
    assert "no _SUCCESS marker" in capsys.readouterr().err


def test_report_computation_loads_no_torch(committed):
    """The driver computes reports without torch (and its libraries) in its process."""
    import subprocess
    import sys

    code = ("import sys; from pipeline.config import StorageConfig; from pipeline.run_report import compute_run_report; "
            f"r = compute_run_report({str(committed)!r}, StorageConfig()); assert r['groups']['groups'] > 0; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_report_on_a_damaged_output_says_what_is_wrong_and_the_repair_works(committed, tmp_path, capsys):
    import shutil

    from pipeline import config_from_dict, read_output

    def damaged(name, damage):
        copy = tmp_path / name
        shutil.copytree(committed, copy)
        damage(copy)
        assert main(["report", str(copy)]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        return copy, err

    files = json.loads((committed / "_manifest.json").read_text())["output"]["files"]
    repair = "delete _SUCCESS there and rerun the job (logo-batch run, same configuration)"
    _, err = damaged("unmarked", lambda d: (d / "_SUCCESS").unlink())
    assert "no _SUCCESS marker; the run is not committed: run the job (logo-batch run) to finish it" in err
    _, err = damaged("garbled", lambda d: (d / "_manifest.json").write_text("{not json"))
    assert f"{tmp_path}/garbled/_manifest.json: not valid JSON (" in err and repair in err
    _, err = damaged("unlisted", lambda d: (d / "_manifest.json").unlink())
    assert "_manifest.json: missing, though _SUCCESS is there; the output is damaged" in err and repair in err
    _, err = damaged("truncated", lambda d: (d / files[1]["path"]).write_bytes(b"PAR1 cut short"))
    assert f"{tmp_path}/truncated/{files[1]['path']}: cannot be read as Parquet (" in err and repair in err
    lost, err = damaged("lost", lambda d: (d / files[0]["path"]).unlink())
    assert f"{lost}/{files[0]['path']}: listed in _manifest.json but missing; the output is damaged: {repair}" in err

    (lost / "_SUCCESS").unlink()  # the repair the message names
    config = json.loads((committed / "_manifest.json").read_text())["config"]
    config["output"]["uri"] = str(lost)
    assert run_job(config_from_dict(config), progress=False).rows_computed == files[0]["rows"]
    assert main(["report", str(lost)]) == 0 and read_output(str(lost)).num_rows == 30


def test_peak_device_memory_is_reported_against_its_budget():
    """An actor on CUDA records its peak device memory and the budget it plans within; the data
    files' largest is what the summary line and report.md show (absent on the CPU)."""
    import time

    from pipeline.outputs import PartFile
    from pipeline.report import build_report
    from pipeline.run_report_plots import _batching_lines

    config = job("model", "pool", "in", "out")
    base = {"batches": 2, "calls": 2, "groups": 2, "union_sum": 2, "decode_groups": 2, "decode_union_sum": 2,
            "loads": 1, "hits": 1, "evictions": 0, "peak_resident": 1}

    def part(name: str, **memory) -> PartFile:
        return PartFile(name=f"{name}.parquet", attempt="a", ranges=[(name, 0, 5)], rows=5,
                        batching=Counter(base, **memory))

    gib = 2**30
    report = build_report(config, [part("x", peak_device_bytes=3 * gib, peak_device_budget_bytes=72 * gib),
                                   part("y", peak_device_bytes=5 * gib, peak_device_budget_bytes=72 * gib)],
                          "a", time.time(), 10)
    assert report.batching["peak_device_bytes"] == 5 * gib and report.batching["loads"] == 2
    assert "peak device memory 5.0 GiB of a budget of 72.0 GiB" in report.format()
    assert any("5.0 GiB of a budget of 72.0 GiB" in line for line in _batching_lines(report.batching))
    cpu = build_report(config, [part("x"), part("y")], "a", time.time(), 10)
    assert "peak device memory" not in cpu.format()
    assert not any("Peak device memory" in line for line in _batching_lines(cpu.batching))
