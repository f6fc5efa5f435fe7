"""The throughput benchmark: its baselines compute what our engine computes, and the command's outputs.

No timing is asserted: the benchmark reports ratios, the tests hold the methods it times to the
same outputs (greedy, token for token) on a tiny model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from actors import read_adapter
from actors.peft_reference import released_generate
from actors.router import Routing
from jobs.benchmarks import methods as M
from jobs.benchmarks.config import LLAMA_8B, RATIO_8B, ShapeRun, preset
from jobs.benchmarks.measure import PeakMemory
from jobs.benchmarks.models import prompts
from jobs.benchmarks.suite import BASELINE, build, engine

SMOKE = preset("smoke")
PART: ShapeRun = SMOKE.shapes[0]
NEW = 6


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.set_num_threads(1)
    return build(PART, SMOKE, tmp_path_factory.mktemp("bench-pool"), torch.device("cpu"), torch.float32,
                 lambda _: None)


@pytest.fixture(scope="module")
def seqs():
    return prompts(PART.regimes[0], 6, PART.shape.vocab, seed=11)


def decoded(e, token_lists):
    return [e.decode(tokens)[0] for tokens in token_lists]


def test_synthetic_adapters_read_back_as_written(setup):
    """The PEFT-format files the baselines load hold the factors our pool stacks."""
    adapter = read_adapter(setup.dirs[3].name, setup.dirs[3])
    module = next(iter(adapter.factors))
    i = setup.pool.index(adapter.name)
    A, B = setup.pool.acquire([i])[i][module]
    torch.testing.assert_close(A, adapter.factors[module].A)
    torch.testing.assert_close(B, adapter.factors[module].B * adapter.factors[module].scale)


def test_peft_single_and_mixed_equal_engine_at_k1(setup, seqs):
    e = engine(setup, 1, NEW)
    gen = M.fixed_length(setup.tokenizer, NEW)
    texts, extra = M.ours_run(e, seqs, batch_size=4)
    M.activate(e)
    chosen = [r.adapters[0] for r in e.route(seqs[:4]) + e.route(seqs[4:])]
    assert len(set(chosen)) > 1, "the test needs rows routed to different adapters"
    mixed = M.hf_generate(setup.peft, seqs, 4, gen, setup.device, adapter_names=chosen)
    assert decoded(e, mixed) == texts
    assert all(len(t) == NEW for t in mixed)

    # (2): one adapter for every row, and our engine given that same routing for every row
    name = setup.dirs[2].name
    setup.peft.base_model.set_adapter(name)
    single = M.hf_generate(setup.peft, seqs, 4, gen, setup.device)
    same = [Routing(indices=(setup.pool.index(name),), adapters=(name,), weights=(1.0,))] * len(seqs)
    ours_single, _ = M.ours_run(e, seqs, 4, routings=same)
    assert decoded(e, single) == ours_single
    base = M.hf_generate(setup.base, seqs, 4, gen, setup.device)
    assert base != single, "the adapters must change the outputs for the comparison to mean anything"


def test_released_procedure_equals_engine_at_general_k(setup, seqs):
    e = engine(setup, 4, NEW)
    gen = M.fixed_length(setup.tokenizer, NEW)
    M.activate(e)
    for seq in seqs[:3]:
        (routing,) = e.route([seq])
        assert len(routing.adapters) == 4 and len(set(routing.weights)) > 1
        (text,), _, _ = e.generate([seq], [routing])
        theirs = released_generate(setup.peft, seq, routing, gen, setup.device)
        assert e.decode(theirs)[0] == text
    setup.peft.base_model.set_adapter(setup.dirs[0].name)


def test_given_clustered_selections_read_only_their_union(setup, seqs):
    rts = M.synthetic_routings(len(seqs), len(setup.pool), 4, 3, seed=1, names=setup.pool.names)
    assert len({r.indices for r in rts}) == 2
    e = engine(setup, 4, NEW)
    _, extra = M.ours_run(e, seqs, len(seqs), routings=rts)
    assert extra["groups"] <= 2 and extra["max_union"] <= 8


def test_scattered_selections_in_one_call_equal_rows_alone_and_the_released_procedure(setup, seqs):
    """Scattered selections: every row its own; one generate call for all of them gives each row's
    output alone, and the mixture reference (through the release procedure)."""
    rts = M.synthetic_routings(len(seqs), len(setup.pool), 4, 1, seed=3, names=setup.pool.names)
    e = engine(setup, 4, NEW)
    texts, extra = M.ours_run(e, seqs, len(seqs), routings=rts)
    assert extra["groups"] == 1 and extra["max_union"] > 4
    assert [M.ours_run(e, [seq], 1, routings=[r])[0][0] for seq, r in zip(seqs, rts)] == texts
    gen = M.fixed_length(setup.tokenizer, NEW)
    for seq, routing, text in list(zip(seqs, rts, texts))[:2]:
        assert e.decode(released_generate(setup.peft, seq, routing, gen, setup.device))[0] == text
    setup.peft.base_model.set_adapter(setup.dirs[0].name)


def test_probe_in_length_buckets_routes_like_one_pass(setup):
    import dataclasses

    seqs = prompts(PART.regimes[1], 6, PART.shape.vocab, seed=5)
    e = engine(setup, 4, NEW)
    M.activate(e)
    e.generation = dataclasses.replace(e.generation, probe_bucket_overhead=0.0)  # one pass per row
    bucketed = e.route(seqs)
    e.generation = dataclasses.replace(e.generation, probe_bucket_overhead=float("inf"))
    whole = e.route(seqs)
    assert [r.adapters for r in bucketed] == [r.adapters for r in whole]
    for a, b in zip(bucketed, whole):
        assert a.weights == pytest.approx(b.weights, abs=1e-5)


def test_peak_memory_sees_an_allocation():
    import mmap

    with PeakMemory(torch.device("cpu")) as mem:
        # A fresh anonymous mapping (not memory the allocator already holds), every page touched.
        block = mmap.mmap(-1, 64 * 2**20)
        block.write(b"\x01" * len(block))
        block.close()
    if mem.extra is None:
        pytest.skip("no /proc/self/clear_refs here")
    assert mem.extra >= 48 * 2**20


def test_lora_work_ratio_of_the_documented_shapes():
    assert LLAMA_8B.lora_work_ratio() == pytest.approx(0.0056, abs=0.0002)
    assert RATIO_8B.lora_work_ratio() == pytest.approx(0.0072, abs=0.0002)


def test_smoke_run_writes_every_method(tmp_path: Path, capsys):
    from jobs.cli import main

    assert main(["bench", "--smoke", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "bench.json").read_text())
    cfg = SMOKE
    top = max(cfg.ks)
    expected = {"base", BASELINE, "peft-mixed", f"released-k{cfg.released_k}", "arrow", "probe"}
    expected |= {f"ours-k{k}" for k in cfg.ks}
    expected |= {f"given-{c}-k{top}" for c in ("clustered", "scattered")}
    (entry,) = report["shapes"]
    assert [r["regime"]["name"] for r in entry["regimes"]] == ["generation", "labelling"]
    for reg in entry["regimes"]:
        by = {m["name"]: m for m in reg["methods"]}
        assert set(by) == expected
        assert by[BASELINE]["x_baseline"] == pytest.approx(1.0)
        assert all(m["prompts_per_s"] > 0 for m in by.values())
        assert by["base"]["new_tokens"] == cfg.prompts * reg["regime"]["new_tokens"]
        assert {"floor_prompts_per_s", f"ours_k{top}_x_floor", "ours_x_baseline"} <= set(reg["summary"])
    rows = report["sweep"]["rows"]
    assert sorted({(r["pool"], r["k"]) for r in rows}) == sorted((n, k) for n in cfg.sweep_pools for k in cfg.ks)
    assert (tmp_path / "sweep.png").stat().st_size > 1000
    assert "| peft-single |" in capsys.readouterr().out
    results = (tmp_path / "results.md").read_text()  # the figures as a results file: date, machine, command
    assert results.startswith("# Throughput benchmark (smoke)\n\n- date: 20") and "- machine: " in results
    assert "- command: `logo-batch bench" in results and "| peft-single |" in results


def test_the_gpu_preset_measures_both_8b_shapes_in_bfloat16_on_cuda():
    cfg = preset("gpu")
    assert (cfg.device, cfg.dtype, cfg.batch_size, cfg.sweep_pools) == ("cuda", "bfloat16", 64, ())
    assert [part.shape.name for part in cfg.shapes] == ["8b-ratio", "8b-width"]
    assert cfg.shapes[1].shape.lora_work_ratio() == pytest.approx(LLAMA_8B.lora_work_ratio(), rel=0.5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_smoke_run_on_cuda_in_bfloat16(tmp_path: Path):
    from jobs.cli import main

    assert main(["bench", "--smoke", "--device", "cuda", "--dtype", "bfloat16", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["device"].startswith("cuda") and report["dtype"] == "bfloat16"


def test_the_gpu_check_runs_its_four_parts_on_the_cpu(capsys):
    """The check `bench --gpu` runs first, on the CPU in float32 with a tiny shape: the slot mixture
    equals the reference and PEFT at k = 1, every decode step is timed, the graph is said to be
    skipped, and without CUDA `bench --gpu` refuses in one line."""
    from jobs.benchmarks import gpu_check
    from jobs.benchmarks.config import TINY
    from jobs.cli import main

    result = gpu_check.run(device="cpu", dtype="float32", shape=TINY, pool_size=8, rows=4, prompt_tokens=5,
                           ks=(1, 4), steps=2, log=lambda msg: None)
    assert result["mixture_vs_reference"] < 1e-5 and result["k1_vs_peft"] < 1e-4
    assert set(result["step_ms"]) == {"base", "peft single", "ours k=1", "ours k=4"}
    assert all(ms > 0 for ms in result["step_ms"].values())
    assert result["graph"] == {"captured": False, "error": "no CUDA device"}
    assert "| ours k=4 |" in gpu_check.table(result)
    if not torch.cuda.is_available():
        assert main(["bench", "--gpu"]) == 2
        assert "no CUDA device is visible" in capsys.readouterr().err


@pytest.mark.slow
def test_the_startup_benchmark_counts_the_index_read_against_the_full_read(tmp_path):
    from jobs.benchmarks import startup

    result = startup.run(12, log=lambda msg: None, work=tmp_path)
    runs = result["runs"]
    assert len(runs) == 9 and {(r["actors"], r["mode"]) for r in runs} == {(n, m) for n in (1, 2) for m in
                                                                              ("before", "after", "shared")}
    full = result["disk_bytes"]
    for r in runs:  # before: every tensor of every file (float32 on disk); after: q_proj and v_proj only;
        if r["mode"] == "before":  # shared: none (the index file was written by an earlier load)
            assert full * 0.99 < r["bytes_read"] < full
        elif r["mode"] == "after":
            assert 0 < r["bytes_read"] < full * 0.6
        else:
            assert r["bytes_read"] == 0
    assert "| 2 |" in startup.table(result)
