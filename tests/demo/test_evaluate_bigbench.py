"""A smoke run of `logo-batch eval --suite bigbench` on a tiny model, a tiny archive and a random pool:
every method on both blocks, with the selections each method is defined by, and routing alone (slow:
a minute on 2 busy CPU cores); a pool that lacks a task's adapter stops the run before any work."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from jobs.demo.bigbench import ARCHIVE_NAME, adapter_name
from jobs.demo.confidence_study import THRESHOLDS
from jobs.demo.evaluate_bigbench import BigbenchEvalConfig, fallback_choice, run_bigbench, uncertain_choice
from jobs.demo.report import bigbench_report, plot_heatmap
from tests.demo.test_bigbench import CHOICE, FREE, SUB_ONE, SUB_TWO, _write_archive
from tests.tiny import tiny_adapter, tiny_model_dir

POOL = ("free", "choice", "family/one")
HELD_OUT = ("family/two",)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("bbeval")
    archive = _write_archive(root / ARCHIVE_NAME, {"free/task.json": FREE, "choice/task.json": CHOICE,
                                                    "family/one/task.json": SUB_ONE, "family/two/task.json": SUB_TWO})
    model_dir = tiny_model_dir(root / "model", max_positions=1024)
    for i, task in enumerate(POOL):
        tiny_adapter(model_dir, root / "pool" / adapter_name(task), target_modules=("q_proj", "v_proj"), seed=i)
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    cfg = BigbenchEvalConfig(per_task=2, pool_tasks=POOL, held_out_tasks=HELD_OUT, paper_ks=(1, 3),
                             default_ks=(1, 2), random_ks=(2,), calibration_sample=4, max_new_tokens=3,
                             batch_size=4, reference_prompts=8)
    return run_bigbench(model, tokenizer, cfg, root / "pool", archive, log=lambda _: None)


@pytest.mark.slow
def test_every_method_runs_on_both_blocks(results):
    methods = {n: m for n, m in results["methods"].items() if m["group"] not in ("fallback", "uncertain")}
    assert set(methods) == {"base", "oracle (own adapter)", "uniform (all 3)", "random k=2", "paper preset k=1",
                            "paper preset k=3", "job default k=1", "job default k=2", "in-process default k=1",
                            "PEFT Arrow top-3 (peer)"}
    assert results["n_pool_prompts"] == 6 and results["n_held_out_prompts"] == 2
    for name, m in methods.items():
        assert 0.0 <= m["exact_match"]["pool"] <= 1.0
        assert set(m["per_task"]) == set(POOL + HELD_OUT)
        if name == "oracle (own adapter)":  # no adapter of their own: the oracle has nothing to say there
            assert m["exact_match"]["held_out"] is None and m["per_task"]["family/two"] is None
        else:
            assert 0.0 <= m["exact_match"]["held_out"] <= 1.0
    assert results["paper_best_k"] in (1, 3)
    assert set(results["routing_top1"]) == {"paper preset", "job default (input calibration)",
                                            "in-process default (reference)"}
    for r in results["routing_top1"].values():
        assert set(r["per_task"]) == set(POOL) and 0.0 <= r["overall"] <= 1.0


@pytest.mark.slow
def test_the_fallback_is_swept_from_the_rows_generated(results):
    methods = results["methods"]
    for name in ("job default k=1", "in-process default k=1"):
        entry = results["fallback"][name]
        assert [s["min_confidence"] for s in entry["sweep"]] == list(THRESHOLDS)
        off = entry["sweep"][0]  # no fallback: the method itself
        assert off["pool_em"] == methods[name]["exact_match"]["pool"] and off["pool_fallback"] == 0.0
        assert off["held_out_em"] == methods[name]["exact_match"]["held_out"]
        shares = [s["pool_fallback"] for s in entry["sweep"][1:]]
        assert shares == sorted(shares)  # a higher threshold sends at least as many rows to the base model
        extra = [n for n in methods if n.startswith(f"{name}, min_confidence=")]
        assert extra == ([] if entry["choice"] is None else [f"{name}, min_confidence={entry['choice']:g}"])
        if extra:
            sent = next(s for s in entry["sweep"] if s["min_confidence"] == entry["choice"])
            assert methods[extra[0]]["exact_match"]["pool"] == sent["pool_em"]
    assert "Base-model fallback" in bigbench_report(results)


@pytest.mark.slow
def test_the_per_row_k_is_swept_and_its_rows_recorded(results):
    cfg_ks, n = (3, 5), results["n_prompts"]
    for label in ("job default", "in-process default"):
        for wide in cfg_ks:
            lines = results["uncertain"][f"{label}, uncertain_k={wide}"]
            assert [x["uncertain_below"] for x in lines] == list(THRESHOLDS[1:])
            shares = [x["widened"] for x in lines]
            assert shares == sorted(shares) and all(0.0 <= x <= 1.0 for x in shares)
    rows = results["rows"]
    assert len(rows["task"]) == len(rows["in_pool"]) == n
    assert all(len(c) == n for c in rows["correct"].values()) and set(rows["confidence"]) == {
        "job default k=1", "in-process default k=1"}
    assert "Per-row k" in bigbench_report(results)


def test_the_fallback_threshold_follows_the_rule():
    def line(t, pool, held):
        return {"min_confidence": t, "pool_em": pool, "held_out_em": held, "pool_fallback": 0.0,
                "held_out_fallback": 0.0}
    sweep = [line(None, 0.80, 0.10), line(0.0, 0.79, 0.15), line(0.5, 0.78, 0.30), line(1.0, 0.70, 0.40)]
    assert fallback_choice(sweep, base_held_out=0.20) == 0.5  # 1.0 costs the pool's tasks more than 3%
    assert fallback_choice(sweep, base_held_out=0.35) is None  # none reaches the base model's held-out EM
    assert fallback_choice(sweep, base_held_out=0.12) == 0.5  # the best held-out EM among those allowed
    assert fallback_choice([line(None, 0.80, None), line(0.0, 0.80, None)], base_held_out=0.1) is None
    # held-out rows already above the base model without it: on only where it raises them further
    assert fallback_choice(sweep, base_held_out=0.05, off_held_out=0.20) == 0.5
    assert fallback_choice(sweep, base_held_out=0.05, off_held_out=0.30) is None  # only 1.0 helps, at a cost
    assert fallback_choice(sweep[:2], base_held_out=0.05, off_held_out=0.15) is None


def test_the_per_row_k_follows_the_rule():
    def line(t, pool, held, widened=0.5):
        return {"uncertain_below": t, "pool_em": pool, "held_out_em": held, "widened": widened}
    k1 = {"pool": 0.80, "held_out": 0.30}
    sweeps = {3: [line(0.5, 0.79, 0.35), line(1.0, 0.70, 0.50)], 5: [line(0.5, 0.78, 0.40), line(1.0, 0.79, 0.40)]}
    assert uncertain_choice(sweeps, k1) == (1.0, 5)  # 1.0 with 3 costs the pool more than 3%; then the pool EM
    assert uncertain_choice({3: [line(0.5, 0.80, 0.30)]}, k1) is None  # held-out no better than k = 1
    assert uncertain_choice(sweeps, {"pool": 0.80, "held_out": None}) is None


@pytest.mark.slow
def test_selections_match_their_definition(results):
    methods = results["methods"]
    assert methods["base"]["mean_selected"] == 0 and methods["base"]["own_selected"] == 0.0
    assert methods["oracle (own adapter)"]["own_selected"] == 1.0
    assert methods["uniform (all 3)"]["own_selected"] == 1.0 and methods["uniform (all 3)"]["mean_selected"] == 3
    assert methods["paper preset k=3"]["mean_selected"] == 3 and methods["job default k=2"]["mean_selected"] == 2
    assert methods["random k=2"]["mean_selected"] == 2


@pytest.mark.slow
def test_report_and_heatmap_render(results, tmp_path):
    text = bigbench_report(results, "logo-batch eval --suite bigbench")
    assert "| job default k=1 |" in text and "held-out BBH task" in text and "family/two" in text
    assert "Command: `logo-batch eval --suite bigbench`" in text
    for matrix in results["heatmaps"].values():
        assert len(matrix) == len(POOL) + len(HELD_OUT)
        assert all(abs(sum(row) - 1.0) < 1e-6 for row in matrix)
    plot_heatmap(results, tmp_path / "heatmap.png")
    assert (tmp_path / "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    json.dumps(results)


@pytest.mark.slow
def test_routing_only_measures_top1_and_generates_nothing(tmp_path):
    archive = _write_archive(tmp_path / ARCHIVE_NAME, {"free/task.json": FREE, "choice/task.json": CHOICE})
    model_dir = tiny_model_dir(tmp_path / "model")
    for i, task in enumerate(("free", "choice")):
        tiny_adapter(model_dir, tmp_path / "pool" / task, target_modules=("q_proj", "v_proj"), seed=i)
    model = LlamaForCausalLM.from_pretrained(model_dir).eval()
    cfg = BigbenchEvalConfig(per_task=2, pool_tasks=("free", "choice"), held_out_tasks=(), routing_only=True,
                             calibration_sample=4, reference_prompts=4)
    out = run_bigbench(model, AutoTokenizer.from_pretrained(model_dir), cfg, tmp_path / "pool", archive,
                       log=lambda _: None)
    assert out["methods"] == {} and out["heatmaps"] == {}
    assert set(out["routing_top1"]) == {"paper preset", "job default (input calibration)",
                                        "in-process default (reference)"}
    for r in out["routing_top1"].values():
        assert set(r["per_task"]) == {"free", "choice"}
        assert r["overall"] == sum(r["per_task"].values()) / 2  # two prompts per task
    assert "Routing top-1" in bigbench_report(out) and "| method |" not in bigbench_report(out)


def test_a_pool_missing_a_task_stops_before_any_work(tmp_path):
    model_dir = tiny_model_dir(tmp_path / "model")
    tiny_adapter(model_dir, tmp_path / "pool" / "free", target_modules=("q_proj", "v_proj"))
    archive = _write_archive(tmp_path / ARCHIVE_NAME, {"free/task.json": FREE, "choice/task.json": CHOICE})
    model = LlamaForCausalLM.from_pretrained(model_dir).eval()
    cfg = BigbenchEvalConfig(per_task=1, pool_tasks=("free", "choice"), held_out_tasks=())
    with pytest.raises(ValueError, match=r"no adapter for tasks \['choice'\].*--suite bigbench --task choice"):
        run_bigbench(model, AutoTokenizer.from_pretrained(model_dir), cfg, tmp_path / "pool", archive)
