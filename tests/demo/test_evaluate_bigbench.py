"""A smoke run of `logo-batch eval --suite bigbench` on a tiny model, a tiny archive and a random pool:
every method on both blocks, with the selections each method is defined by, and routing alone (slow:
a minute on 2 busy CPU cores); a pool that lacks a task's adapter stops the run before any work."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from jobs.demo.bigbench import ARCHIVE_NAME, adapter_name
from jobs.demo.evaluate_bigbench import BigbenchEvalConfig, run_bigbench
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
    methods = results["methods"]
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
