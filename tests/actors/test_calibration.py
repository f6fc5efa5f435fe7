"""Calibrated routing: statistics from unlabeled prompts, fixed before routing, removing adapter gain."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from actors import LoGoPredictor, Router, RoutingConfig
from actors.calibration import CalibrationStats, reference_prompts
from tests.actors.conftest import PROMPTS
from tests.actors.test_router import direct_routing

CALIB = reference_prompts()[:40]
PAPER = dict(probe_layers=-1, probe_module="q_proj", calibration_score="raw")


def make(tiny_dir, pool, **options):
    return LoGoPredictor(model=tiny_dir, adapters=pool, max_new_tokens=2, device="cpu", **options)


@pytest.fixture(scope="module")
def scaled_pool(pool_dir, tmp_path_factory):
    """The same pool with one adapter's B factors multiplied by 100 (its gain, nothing else)."""
    root = tmp_path_factory.mktemp("scaled")
    shutil.copytree(pool_dir, root, dirs_exist_ok=True)
    path = root / "a_attn" / "adapter_model.safetensors"
    tensors = load_file(path)
    save_file({k: v * 100 if "lora_B" in k else v for k, v in tensors.items()}, path)
    return root


def test_statistics_do_not_depend_on_order_or_split(tiny_dir, pool_dir, tmp_path):
    a = make(tiny_dir, pool_dir, calibration_prompts=CALIB).calibration
    b = make(tiny_dir, pool_dir, calibration_prompts=CALIB[::-1]).calibration
    assert a.mean == b.mean and a.std == b.std and a.count == 40
    pairs = [f"model.layers.{b}.self_attn.{m}" for b in range(4) for m in ("q_proj", "v_proj")]
    assert a.probe == {"signal": "norm", "probe_input": "residual", "pairs": pairs}
    assert len(a.mean) == len(a.std) == len(pairs) and all(len(row) == 6 for row in a.mean)
    # Saved and reloaded (as every actor of a job gets them): identical routing.
    a.save(tmp_path / "stats.json")
    assert CalibrationStats.load(tmp_path / "stats.json") == a
    p1 = make(tiny_dir, pool_dir, k=3, calibration=tmp_path / "stats.json", calibration_score="ratio")
    p2 = make(tiny_dir, pool_dir, k=3, calibration_prompts=CALIB, calibration_score="ratio")
    prompts = np.array(PROMPTS, dtype=object)
    assert list(p1({"prompt": prompts})["adapters"]) == list(p2({"prompt": prompts})["adapters"])


@pytest.mark.parametrize("score", ["ratio", "zscore"])
@pytest.mark.parametrize("probe", [dict(), dict(probe_layers=-1, probe_module="q_proj"),
                                   dict(probe_layers=[1, 3], probe_module="v_proj", probe_input="module_input")])
def test_calibrated_routing_equals_direct_computation(tiny_dir, pool_dir, score, probe):
    predictor = make(tiny_dir, pool_dir, k=3, calibration_prompts=CALIB, calibration_score=score, **probe)
    plain = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    config = predictor.engine.routing
    out = predictor({"prompt": np.array(PROMPTS, dtype=object)})
    for row, prompt in enumerate(PROMPTS):
        names, weights = direct_routing(plain, pool_dir, predictor.encode(prompt)[0], config, predictor.calibration)
        assert out["adapters"][row] == names
        assert out["weights"][row] == pytest.approx(weights, rel=1e-4, abs=1e-6)


def test_statistics_do_not_depend_on_batching(tiny_dir, pool_dir):
    """Statistics are per prompt (no padding) and exactly summed: the same prompts give the same
    numbers computed together, in two halves merged by count, or in another order."""
    whole = make(tiny_dir, pool_dir, calibration_prompts=CALIB).calibration
    halves = [make(tiny_dir, pool_dir, calibration_prompts=part).calibration for part in (CALIB[:17], CALIB[17:])]
    for p, row in enumerate(whole.mean):
        for i, mean in enumerate(row):
            merged = (halves[0].mean[p][i] * 17 + halves[1].mean[p][i] * (len(CALIB) - 17)) / len(CALIB)
            assert mean == pytest.approx(merged, rel=1e-12)
    predictor = make(tiny_dir, pool_dir, calibration_prompts=CALIB)
    router, engine = predictor.engine.router, predictor.engine
    seqs = [predictor.encode(p)[0] for p in CALIB[:8]]
    batched = router.raw_scores(router.probe(*engine.pad(seqs)))  # (8, P, N), padded together
    single = torch.cat([router.raw_scores(router.probe(*engine.pad([s]))) for s in seqs])
    torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-5)


def test_absent_module_never_outranks_present_adapters(tiny_dir, pool_dir):
    """d_first_layers adapts q_proj of blocks 0-1 only: probed at block 3 it scores nothing there, and
    under zscore (where present adapters often score below 0) it still ranks after every one of them."""
    predictor = make(tiny_dir, pool_dir, k=6, calibration_prompts=CALIB, calibration_score="zscore",
                     probe_layers=-1, probe_module="q_proj")
    out = predictor({"prompt": np.array(PROMPTS, dtype=object)})
    router = predictor.engine.router
    negative = 0
    for row, prompt in enumerate(PROMPTS):
        assert out["adapters"][row][-1] == "d_first_layers"
        uniform = out["warning"][row] is not None and "uniform weights" in out["warning"][row]
        assert out["weights"][row][-1] == (1 / 6 if uniform else 0.0)
        ids = torch.tensor([predictor.encode(prompt)[0]])
        scores = router.scores(router.probe(ids, torch.ones_like(ids)))[0]
        present = [i for i, n in enumerate(predictor.pool.names) if n != "d_first_layers"]
        negative += int(scores[present].min() < 0)
    assert negative > 0, "the test needs prompts where a present adapter has a negative z-score"


@pytest.mark.parametrize("score", ["ratio", "zscore"])
def test_calibration_removes_adapter_gain(tiny_dir, pool_dir, scaled_pool, score):
    prompts = np.array(PROMPTS, dtype=object)
    before = make(tiny_dir, pool_dir, k=2, calibration_prompts=CALIB, calibration_score=score)({"prompt": prompts})
    after = make(tiny_dir, scaled_pool, k=2, calibration_prompts=CALIB, calibration_score=score)({"prompt": prompts})
    assert list(before["adapters"]) == list(after["adapters"])
    for w0, w1 in zip(before["weights"], after["weights"]):
        assert w1 == pytest.approx(w0, abs=1e-4)
    raw_before = make(tiny_dir, pool_dir, k=2, **PAPER)({"prompt": prompts})
    raw_after = make(tiny_dir, scaled_pool, k=2, **PAPER)({"prompt": prompts})
    assert list(raw_before["adapters"]) != list(raw_after["adapters"])
    assert all(a[0] == "a_attn" for a in raw_after["adapters"]), "raw scores follow the gain"


def test_default_routing_ignores_adapter_gain(tiny_dir, pool_dir, scaled_pool):
    """With no routing option at all, a pool with one adapter 100x louder routes as the plain pool."""
    prompts = np.array(PROMPTS, dtype=object)
    plain, loud = make(tiny_dir, pool_dir), make(tiny_dir, scaled_pool)
    assert plain.calibration.source == "reference" and plain.engine.routing == RoutingConfig()
    before, after = plain({"prompt": prompts}), loud({"prompt": prompts})
    assert list(before["adapters"]) == list(after["adapters"])
    assert len({a[0] for a in before["adapters"]}) > 1, "prompts reach more than one adapter"
    for w0, w1 in zip(before["weights"], after["weights"]):
        assert w1 == pytest.approx(w0, abs=1e-4)


def test_calibration_refusals(tiny_dir, pool_dir, scaled_pool, tmp_path):
    predictor = make(tiny_dir, pool_dir, calibration_score="raw")
    with pytest.raises(ValueError, match="calibration_score='ratio' needs calibration statistics"):
        Router(predictor.engine.model, predictor.pool, RoutingConfig(calibration_score="ratio"))
    with pytest.raises(ValueError, match="calibration_score: must be one of raw, ratio, zscore; got 'softmax'"):
        make(tiny_dir, pool_dir, calibration_score="softmax")
    stats = make(tiny_dir, pool_dir, calibration_prompts=CALIB[:5]).calibration
    stats.save(tmp_path / "stats.json")
    with pytest.raises(ValueError, match="computed with probe .* but routing uses"):
        make(tiny_dir, pool_dir, calibration=tmp_path / "stats.json", calibration_score="ratio", signal="entropy")
    last = make(tiny_dir, pool_dir, calibration_prompts=CALIB[:5], probe_layers=-1).calibration
    last.save(tmp_path / "last.json")
    assert last.probe["pairs"] == ["model.layers.3.self_attn.q_proj", "model.layers.3.self_attn.v_proj"]
    with pytest.raises(ValueError, match=r"computed with probe .*'pairs': 2.* but routing uses .*'pairs': 8"):
        make(tiny_dir, pool_dir, calibration=tmp_path / "last.json")  # the default probes every block
    (tmp_path / "sub").mkdir()
    shutil.copytree(pool_dir / "b_qv", tmp_path / "sub" / "b_qv")
    with pytest.raises(ValueError, match="another adapter pool"):
        make(tiny_dir, tmp_path / "sub", calibration=tmp_path / "stats.json", calibration_score="ratio")
    with pytest.raises(ValueError, match="no such statistics file"):
        make(tiny_dir, pool_dir, calibration=tmp_path / "none.json", calibration_score="ratio")


def test_combined_probe_modules(tiny_dir, pool_dir):
    single = make(tiny_dir, pool_dir, k=6, probe_layers=-1, probe_module="q_proj", calibration_score="raw")
    combined = make(tiny_dir, pool_dir, k=6, probe_layers=-1, probe_module=("q_proj", "v_proj"),
                    calibration_prompts=CALIB, calibration_score="ratio")
    assert len(combined.calibration.mean) == 2
    seq = single.encode("hello there")[0]
    ids = torch.tensor([seq])
    hs = combined.engine.router.probe(ids, torch.ones_like(ids))
    raw = combined.engine.router.raw_scores(hs)  # (1, 2, N)
    q_only = single.engine.router.raw_scores(single.engine.router.probe(ids, torch.ones_like(ids)))
    torch.testing.assert_close(raw[:, :1], q_only)
    mean = torch.tensor(combined.calibration.mean, dtype=torch.float64)
    expected = torch.where(mean > 0, raw[0].double() / mean, torch.zeros_like(mean)).sum(0)
    torch.testing.assert_close(combined.engine.router.scores(hs)[0], expected)
