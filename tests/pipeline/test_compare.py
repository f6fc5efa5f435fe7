"""`logo-batch report --compare A B`: every number recomputed here from the two runs' Parquet files."""

from __future__ import annotations

import json
import shutil
from collections import Counter

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from jobs.cli import main
from pipeline import run_job
from pipeline.compare import COMPARE_JSON, COMPARE_MD, COMPARE_PNG, distance
from tests.pipeline.conftest import job, prompt

ROWS = 24


@pytest.fixture(scope="module")
def runs(ray_runtime, tiny_assets, tmp_path_factory):
    """Two committed runs of the same prompts (ids r0..r23): A with k = 2, B with k = 3 and one row blank."""
    model, pool = tiny_assets
    root = tmp_path_factory.mktemp("compare")
    for name, k, blank in (("a", 2, None), ("b", 3, 5)):
        (root / f"in-{name}").mkdir()
        prompts = [prompt(i) for i in range(ROWS)]
        if blank is not None:
            prompts[blank] = ""
        pq.write_table(pa.table({"prompt": prompts, "id": [f"r{i}" for i in range(ROWS)]}),
                       root / f"in-{name}" / "p.parquet")
        run_job(job(model, pool, str(root / f"in-{name}"), str(root / name), routing={"k": k},
                    input={"id_column": "id"}, resources={"rows_per_block": 8}, run={"max_error_fraction": 0.1}),
                progress=False)
    return root / "a", root / "b"


def _rows(out) -> list[dict]:
    manifest = json.loads((out / "_manifest.json").read_text())
    return [r for f in manifest["output"]["files"] for r in pq.read_table(out / f["path"]).to_pylist()]


def test_compare_recomputes_from_the_parquet_files(runs, capsys):
    a, b = runs
    assert main(["report", "--compare", str(a), str(b)]) == 0
    printed = capsys.readouterr().out
    cmp = json.loads((b / COMPARE_JSON).read_text())
    rows_a, rows_b = _rows(a), _rows(b)
    for key, rows in (("A", rows_a), ("B", rows_b)):
        assert cmp[key]["rows"] == len(rows) == ROWS
        assert cmp[key]["errors"] == sum(r["error"] is not None for r in rows)
        assert cmp[key]["error_rate"] == round(cmp[key]["errors"] / ROWS, 6)
    assert cmp["A"]["errors"] == 0 and cmp["B"]["errors"] == 1
    assert cmp["rates"]["error_rate_change"] == round(1 / ROWS, 6)
    routed = {k: [r for r in rows if r["adapters"]] for k, rows in (("A", rows_a), ("B", rows_b))}
    use = {k: Counter(n for r in rs for n in r["adapters"]) for k, rs in routed.items()}
    for entry in cmp["adapters"]:
        name = entry["adapter"]
        assert entry["share_a"] == round(use["A"][name] / len(routed["A"]), 6)
        assert entry["share_b"] == round(use["B"][name] / len(routed["B"]), 6)
    assert {e["adapter"] for e in cmp["adapters"]} == set(use["A"]) | set(use["B"])
    changes = [abs(e["change"]) for e in cmp["adapters"]]
    assert changes == sorted(changes, reverse=True)
    by_id = {r["id"]: r for r in rows_a}
    pairs = [(by_id[r["id"]], r) for r in rows_b if r["error"] is None]
    routing = cmp["routing"]
    assert routing["same_ids"] == len(pairs) == ROWS - 1
    assert routing["changed_adapters"] == sum(sorted(x["adapters"]) != sorted(y["adapters"]) for x, y in pairs)
    moved = sorted(((distance(x["adapters"], x["weights"], y["adapters"], y["weights"]), x["id"]) for x, y in pairs),
                   key=lambda t: (-t[0], t[1]))
    assert [r["id"] for r in routing["most_changed"]] == [i for _, i in moved[:20]]
    assert routing["most_changed"][0]["distance"] == pytest.approx(moved[0][0], abs=1e-6) and moved[0][0] > 0
    for key, rows in (("A", rows_a), ("B", rows_b)):  # the runs' own confidence column
        values = [r["confidence"] for r in rows if r["confidence"] is not None]
        assert cmp["confidence"][key]["rows"] == len(values)
        assert cmp["confidence"][key]["mean"] == pytest.approx(sum(values) / len(values), abs=1e-5)
    assert "| confidence |" in (b / COMPARE_MD).read_text() and "| error rows |" in printed
    assert (b / COMPARE_PNG).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_uses_the_confidence_column_when_the_runs_have_one(runs, tmp_path):
    """Runs whose rows carry `confidence` (here each row's top weight, written into copies of the
    data files): its distribution in each, from the files; a run without the column is named."""
    copies = []
    for out in runs:
        copy = tmp_path / out.name
        shutil.copytree(out, copy)
        manifest = json.loads((copy / "_manifest.json").read_text())
        for f in manifest["output"]["files"]:
            table = pq.read_table(copy / f["path"]).drop_columns(["confidence"])
            top = [max(w) if w else None for w in table.column("weights").to_pylist()]
            pq.write_table(table.append_column("confidence", pa.array(top, pa.float64())), copy / f["path"])
        copies.append(copy)
    assert main(["report", "--compare", *map(str, copies)]) == 0
    c = json.loads((copies[1] / COMPARE_JSON).read_text())["confidence"]
    assert c["present"]
    for key, out in zip(("A", "B"), copies):
        values = [max(r["weights"]) for r in _rows(out) if r["weights"]]
        assert c[key]["rows"] == len(values) == sum(c["histogram"][key])
        assert c[key]["mean"] == pytest.approx(sum(values) / len(values), abs=1e-5)
    assert c["mean_shift"] < 0, "k = 3 spreads the weight: lower top weights than k = 2"
    assert 0 < c["max_cdf_gap"] <= 1
    older = tmp_path / "older"  # a run of a version before the column
    shutil.copytree(copies[0], older)
    for f in json.loads((older / "_manifest.json").read_text())["output"]["files"]:
        pq.write_table(pq.read_table(older / f["path"]).drop_columns(["confidence"]), older / f["path"])
    assert main(["report", "--compare", str(older), str(copies[1])]) == 0
    assert json.loads((copies[1] / COMPARE_JSON).read_text())["confidence"] == {"present": False, "missing_in": ["A"]}
    assert "no `confidence` column" in (copies[1] / COMPARE_MD).read_text()


def test_compare_refuses_an_uncommitted_output(runs, tmp_path, capsys):
    assert main(["report", "--compare", str(runs[0]), str(tmp_path)]) == 2
    assert "no _SUCCESS marker" in capsys.readouterr().err


def test_compare_in_id_buckets_gives_the_one_bucket_result(runs, tmp_path, monkeypatch):
    """Nothing per row stays in the driver: the rows-by-id comparison runs bucket by bucket (a hash
    of the id), the confidence quantiles come from a histogram; many buckets give what one gives."""
    import pipeline.compare as compare
    from pipeline.config import StorageConfig

    copies = []
    for out in runs:  # with a confidence column, so both passes over it run too
        copy = tmp_path / out.name
        shutil.copytree(out, copy)
        for f in json.loads((copy / "_manifest.json").read_text())["output"]["files"]:
            table = pq.read_table(copy / f["path"]).drop_columns(["confidence"])
            top = [max(w) if w else None for w in table.column("weights").to_pylist()]
            pq.write_table(table.append_column("confidence", pa.array(top, pa.float64())), copy / f["path"])
        copies.append(str(copy))
    one = compare.compare_runs(*copies, StorageConfig())
    reads = []
    by_id = compare._by_id
    monkeypatch.setattr(compare, "_by_id", lambda *a: reads.append(a[2:]) or by_id(*a))
    monkeypatch.setattr(compare, "ID_BUCKET_ROWS", 5)
    many = compare.compare_runs(*copies, StorageConfig())
    assert {bucket for bucket, _ in reads} == set(range(5)) and {n for _, n in reads} == {5}  # 24 rows / 5
    assert many == one and one["routing"]["same_ids"] == ROWS - 1
    values = sorted(max(r["weights"]) for r in _rows(runs[0]) if r["weights"])
    width = (max(values) - min(values)) / compare.QUANTILE_BINS
    assert one["confidence"]["A"]["p50"] == pytest.approx(values[len(values) // 2], abs=2 * width + 1e-6)
