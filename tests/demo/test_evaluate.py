"""A smoke run of the quality benchmark: every method end to end on a handful of prompts."""

from __future__ import annotations

import json

import pytest

from jobs.demo.calibration_study import VARIANTS, StudyConfig
from jobs.demo.evaluate import EvalConfig, run_benchmark
from jobs.demo.report import markdown_report, plot_heatmap
from jobs.demo.tasks import TASK_NAMES

TASKS = ("word_order_reversal", "list_max", "number_parity")


@pytest.fixture(scope="module")
def smoke_results(demo_model):
    model, tokenizer = demo_model
    study = StudyConfig(blocks=("last", "all"), modules=("q_proj", "q+v"),
                        input_sample=2, skew_task="list_max", skew_rows=4, reference_prompts=6,
                        em=(("q_proj [last]", "ratio/reference", 1), ("q+v [all]", "zscore/input", 1)))
    cfg = EvalConfig(per_task=1, tasks=TASKS, ks=(1, 0), alt_ks=(1,), random_ks=(2,), batch_size=8,
                     calibration=study)
    return run_benchmark(model, tokenizer, cfg, log=lambda _: None)


def test_every_method_runs(smoke_results):
    methods = smoke_results["methods"]
    groups = {m["group"] for m in methods.values()}
    assert groups == {"reference", "baseline", "logo", "leave-one-out", "peer", "calibrated"}
    expected = {"base", "oracle (own adapter)", f"uniform (all {len(TASK_NAMES)})", "random k=2",
                "logo norm [last] k=1", "logo norm [last] k=all", "logo entropy [last] k=1",
                "logo entropy [last] k=all", "logo norm [mid] k=1", "logo norm [module_input] k=1",
                "logo norm [v_proj] k=1", "leave-one-out: logo norm [last] k=1",
                "leave-one-out: logo norm [last] k=all", "PEFT Arrow top-3 (peer)",
                "calibrated ratio/reference q_proj [last] k=1", "calibrated zscore/input q+v [all] k=1"}
    assert set(methods) == expected
    for m in methods.values():
        assert 0.0 <= m["exact_match"] <= 1.0
        assert set(m["per_task"]) == set(TASKS)
    assert smoke_results["n_prompts"] == len(TASKS)


def test_selections_match_their_definition(smoke_results):
    methods = smoke_results["methods"]
    n = len(TASK_NAMES)
    assert methods["base"]["own_selected"] == 0.0 and methods["base"]["mean_selected"] == 0
    assert methods["oracle (own adapter)"]["own_selected"] == 1.0
    assert methods["logo norm [last] k=all"]["mean_selected"] == n
    assert methods["logo norm [last] k=all"]["own_selected"] == 1.0
    assert methods["leave-one-out: logo norm [last] k=all"]["mean_selected"] == n - 1
    assert methods["leave-one-out: logo norm [last] k=all"]["own_selected"] == 0.0
    assert methods["leave-one-out: logo norm [last] k=1"]["own_selected"] == 0.0
    assert methods["random k=2"]["mean_selected"] == 2


def test_heatmap_rows_are_weight_distributions(smoke_results):
    for matrix in smoke_results["heatmaps"].values():
        assert len(matrix) == len(TASKS) and all(len(row) == len(TASK_NAMES) for row in matrix)
        assert all(abs(sum(row) - 1.0) < 1e-6 for row in matrix)


def test_report_renders(smoke_results, tmp_path):
    text = markdown_report(smoke_results)
    assert "| logo norm [last] k=1 |" in text and "Routing accuracy" in text
    plot_heatmap(smoke_results, tmp_path / "heatmap.png")
    assert (tmp_path / "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    json.dumps(smoke_results)  # serialisable as written by `logo-batch eval`


def test_calibration_study_covers_mixes_probes_and_scores(smoke_results):
    study = smoke_results["calibration"]
    assert study["config"]["reference_prompts"] == 6
    assert set(study["results"]) == {"balanced", "skewed"}
    variants = {score if source is None else f"{score}/{source}" for score, source in VARIANTS}
    for mix, probes in study["results"].items():
        assert set(probes) == {"q_proj [last]", "q+v [last]", "q_proj [all]", "q+v [all]"}
        for probe, entries in probes.items():
            assert set(entries) == variants
            assert all(0.0 <= e["routing_accuracy"] <= 1.0 for e in entries.values())
            assert all(sum(e["top1_counts"].values()) == (3 if mix == "balanced" else 4) for e in entries.values())
        assert "exact_match_k1" in probes["q_proj [last]"]["ratio/reference"]
        assert "exact_match_k1" in probes["q+v [all]"]["zscore/input"]
        assert "exact_match_k1" not in probes["q_proj [last]"]["raw"]
    skewed = study["results"]["skewed"]["q_proj [last]"]["raw"]
    assert "routing_accuracy_majority" in skewed and "routing_accuracy_minority" in skewed
    balanced_em = study["results"]["balanced"]["q_proj [last]"]["ratio/reference"]["exact_match_k1"]
    assert balanced_em == smoke_results["methods"]["calibrated ratio/reference q_proj [last] k=1"]["exact_match"]
    assert "Calibrated routing" in markdown_report(smoke_results)
