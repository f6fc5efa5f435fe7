"""Calibrated routing: statistics from unlabeled prompts, fixed before routing, removing adapter gain."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from actors import LoGoPredictor, RoutingConfig
from actors.calibration import CalibrationStats, reference_prompts
from tests.actors.conftest import PROMPTS
from tests.actors.test_router import direct_routing

CALIB = reference_prompts()[:40]


def make(tiny_dir, pool, **options):
    return LoGoPredictor(model=tiny_dir, adapters=pool, max_new_tokens=2, device="cpu", **options)


@pytest.fixture(scope="module")
def scaled_pool(pool_dir, tmp_path_factory):
    """The same pool with one adapter's B factors multiplied by 10 (its gain, nothing else)."""
    root = tmp_path_factory.mktemp("scaled")
    shutil.copytree(pool_dir, root, dirs_exist_ok=True)
    path = root / "a_attn" / "adapter_model.safetensors"
    tensors = load_file(path)
    save_file({k: v * 10 if "lora_B" in k else v for k, v in tensors.items()}, path)
    return root


def test_statistics_do_not_depend_on_order_or_split(tiny_dir, pool_dir, tmp_path):
    a = make(tiny_dir, pool_dir, calibration_prompts=CALIB).calibration
    b = make(tiny_dir, pool_dir, calibration_prompts=CALIB[::-1]).calibration
    assert a.mean == b.mean and a.std == b.std and a.count == 40
    assert a.probe == {"signal": "norm", "probe_layer": 3, "probe_modules": ["model.layers.3.self_attn.q_proj"],
                       "probe_input": "residual"}
    # Saved and reloaded (as every actor of a job gets them): identical routing.
    a.save(tmp_path / "stats.json")
    assert CalibrationStats.load(tmp_path / "stats.json") == a
    p1 = make(tiny_dir, pool_dir, k=3, calibration=tmp_path / "stats.json", calibration_score="ratio")
    p2 = make(tiny_dir, pool_dir, k=3, calibration_prompts=CALIB, calibration_score="ratio")
    prompts = np.array(PROMPTS, dtype=object)
    assert list(p1({"prompt": prompts})["adapters"]) == list(p2({"prompt": prompts})["adapters"])


def test_ratio_routing_equals_direct_computation(tiny_dir, pool_dir):
    predictor = make(tiny_dir, pool_dir, k=3, calibration_prompts=CALIB, calibration_score="ratio")
    stats = predictor.calibration
    mean = dict(zip(stats.adapters, stats.mean[0]))
    plain = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    config = RoutingConfig(k=len(stats.adapters))
    out = predictor({"prompt": np.array(PROMPTS, dtype=object)})
    for row, prompt in enumerate(PROMPTS):
        names, weights = direct_routing(plain, pool_dir, predictor.encode(prompt)[0], config)
        raw = dict(zip(names, weights))  # proportional to the raw scores
        calibrated = {n: (raw[n] / mean[n] if mean[n] > 0 else 0.0) for n in names}
        chosen = sorted(calibrated, key=lambda n: (-calibrated[n], n))[:3]
        total = sum(calibrated[n] for n in chosen)
        assert out["adapters"][row] == chosen
        assert out["weights"][row] == pytest.approx([calibrated[n] / total for n in chosen], rel=1e-4)


@pytest.mark.parametrize("score", ["ratio", "zscore"])
def test_calibration_removes_adapter_gain(tiny_dir, pool_dir, scaled_pool, score):
    prompts = np.array(PROMPTS, dtype=object)
    before = make(tiny_dir, pool_dir, k=2, calibration_prompts=CALIB, calibration_score=score)({"prompt": prompts})
    after = make(tiny_dir, scaled_pool, k=2, calibration_prompts=CALIB, calibration_score=score)({"prompt": prompts})
    assert list(before["adapters"]) == list(after["adapters"])
    for w0, w1 in zip(before["weights"], after["weights"]):
        assert w1 == pytest.approx(w0, abs=1e-4)
    raw_before = make(tiny_dir, pool_dir, k=2)({"prompt": prompts})
    raw_after = make(tiny_dir, scaled_pool, k=2)({"prompt": prompts})
    assert list(raw_before["adapters"]) != list(raw_after["adapters"])
    assert all(a[0] == "a_attn" for a in raw_after["adapters"]), "raw scores follow the gain"


def test_calibration_refusals(tiny_dir, pool_dir, scaled_pool, tmp_path):
    with pytest.raises(ValueError, match="calibration_score='ratio' needs calibration statistics"):
        make(tiny_dir, pool_dir, calibration_score="ratio")
    with pytest.raises(ValueError, match="calibration_score='softmax' is not known"):
        make(tiny_dir, pool_dir, calibration_score="softmax")
    stats = make(tiny_dir, pool_dir, calibration_prompts=CALIB[:5]).calibration
    stats.save(tmp_path / "stats.json")
    with pytest.raises(ValueError, match="computed with probe .* but routing uses"):
        make(tiny_dir, pool_dir, calibration=tmp_path / "stats.json", calibration_score="ratio", signal="entropy")
    (tmp_path / "sub").mkdir()
    shutil.copytree(pool_dir / "b_qv", tmp_path / "sub" / "b_qv")
    with pytest.raises(ValueError, match="another adapter pool"):
        make(tiny_dir, tmp_path / "sub", calibration=tmp_path / "stats.json", calibration_score="ratio")
    with pytest.raises(ValueError, match="no such statistics file"):
        make(tiny_dir, pool_dir, calibration=tmp_path / "none.json", calibration_score="ratio")


def test_combined_probe_modules(tiny_dir, pool_dir):
    single = make(tiny_dir, pool_dir, k=6, probe_module="q_proj")
    combined = make(tiny_dir, pool_dir, k=6, probe_module=("q_proj", "v_proj"), calibration_prompts=CALIB,
                    calibration_score="ratio")
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
