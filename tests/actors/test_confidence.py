"""Per-row confidence (a pure function of the row) and the base model when no adapter fits."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from actors import LoGoPredictor, RoutingConfig
from actors.options import PAPER_ROUTING
from tests.actors.conftest import PROMPTS


def _options(tiny_dir, pool_dir, **extra):
    return {**dict(model=tiny_dir, adapters=pool_dir, k=2, max_new_tokens=6, device="cpu"), **extra}


@pytest.fixture(scope="module")
def plain(tiny_dir, pool_dir):
    return LoGoPredictor(**_options(tiny_dir, pool_dir))


def test_confidence_in_every_row_and_the_calibrated_top_score_per_pair(plain):
    prompts = np.array([*PROMPTS, None, ""], dtype=object)
    out = plain({"prompt": prompts})
    router = plain.engine.router
    for i, prompt in enumerate(PROMPTS):
        c = out["confidence"][i]
        assert isinstance(c, float) and math.isfinite(c), prompt
        seq = plain.encode(prompt)[0]
        scores = router.scores(router.probe(*plain.engine.pad([seq])))  # (1, N)
        # padded in the batch: float32 rounding of the probe, absolute in the calibrated score (a
        # confidence near 0 has no relative precision to speak of)
        assert c == pytest.approx(float(scores.max()) / len(router.pairs), rel=1e-4, abs=1e-5)
    assert out["confidence"][len(PROMPTS)] is None and out["confidence"][len(PROMPTS) + 1] is None  # error rows
    values = [out["confidence"][i] for i in range(len(PROMPTS))]
    assert max(values) - min(values) > 0.1, "prompts should not all be equally confident"


@pytest.mark.parametrize("dtype,tolerance", [("float32", 1e-4), ("bfloat16", 2e-3)])
def test_confidence_is_a_function_of_the_row(tiny_dir, pool_dir, dtype, tolerance):
    """Alone, in a batch and in a shuffled batch: the same confidence (to float32 rounding of the
    probe, divided by each adapter's spread; bfloat16: rows of one length probed together, unpadded)."""
    predictor = LoGoPredictor(**_options(tiny_dir, pool_dir, dtype=dtype, calibration_prompts=PROMPTS))
    prompts = [f"{p} #{i}" for i in range(2) for p in PROMPTS]
    order = np.random.default_rng(3).permutation(len(prompts))
    batch = predictor({"prompt": np.array(prompts, dtype=object)})["confidence"]
    shuffled = predictor({"prompt": np.array([prompts[i] for i in order], dtype=object)})["confidence"]
    back = [None] * len(prompts)
    for j, i in enumerate(order):
        back[i] = shuffled[j]
    for i, prompt in enumerate(prompts):
        alone = predictor({"prompt": np.array([prompt], dtype=object)})["confidence"][0]
        assert batch[i] == pytest.approx(alone, abs=tolerance, rel=tolerance), prompt
        assert back[i] == pytest.approx(alone, abs=tolerance, rel=tolerance), prompt


def _base_generation(tiny_dir, prompt: str, max_new_tokens: int) -> str:
    """The base model alone, greedy, through plain transformers."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id)
    new = out[0, ids.shape[1]:].tolist()
    ends = {tokenizer.eos_token_id, tokenizer.pad_token_id}
    new = new[:next((i for i, t in enumerate(new) if t in ends), len(new))]
    return tokenizer.decode(new, skip_special_tokens=True)


def test_a_row_below_min_confidence_is_generated_by_the_base_model_alone(tiny_dir, pool_dir, plain):
    prompts = np.array(PROMPTS, dtype=object)
    confidence = list(plain({"prompt": prompts})["confidence"])
    threshold = float(np.median(confidence))
    gated = LoGoPredictor(**_options(tiny_dir, pool_dir, min_confidence=threshold))
    out = gated({"prompt": prompts})
    below = [i for i, c in enumerate(confidence) if c < threshold]
    assert 0 < len(below) < len(PROMPTS)
    assert gated.last_stats.union_sizes and max(gated.last_stats.union_sizes) >= 2, "others still mix adapters"
    for i, prompt in enumerate(PROMPTS):
        assert out["confidence"][i] == pytest.approx(confidence[i], abs=1e-6)
        assert out["error"][i] is None
        if i in below:
            assert out["adapters"][i] == [] and out["weights"][i] == [], prompt
            assert "routing.min_confidence" in out["warning"][i] and "base model alone" in out["warning"][i]
            assert out["output"][i] == _base_generation(tiny_dir, prompt, 6), prompt
        else:
            assert len(out["adapters"][i]) == 2 and out["warning"][i] is None, prompt
    assert gated.stats.base_only == len(below)


def test_min_confidence_is_checked_and_named(tiny_dir, pool_dir):
    for bad in ("high", True, float("nan"), float("inf"), [1.0]):
        with pytest.raises(ValueError, match="min_confidence"):
            RoutingConfig(min_confidence=bad)
    with pytest.raises(ValueError, match="min_confidence: needs calibrated scores"):
        RoutingConfig(min_confidence=0.5, calibration_score="raw")
    assert RoutingConfig(min_confidence=1).min_confidence == 1.0
    assert PAPER_ROUTING["min_confidence"] is None, "the paper's method has no fallback"
    with pytest.raises(ValueError, match="min_confidence"):
        LoGoPredictor(**_options(tiny_dir, pool_dir, min_confidence="x"))


def test_a_row_below_uncertain_below_mixes_uncertain_k_adapters(tiny_dir, pool_dir, plain):
    prompts = np.array(PROMPTS, dtype=object)
    confidence = list(plain({"prompt": prompts})["confidence"])
    threshold = float(np.median(confidence))
    wide = LoGoPredictor(**_options(tiny_dir, pool_dir, uncertain_below=threshold, uncertain_k=3))
    three = LoGoPredictor(**_options(tiny_dir, pool_dir, k=3))  # what a widened row gets: the top 3
    out, top3, top2 = wide({"prompt": prompts}), three({"prompt": prompts}), plain({"prompt": prompts})
    below = [i for i, c in enumerate(confidence) if c < threshold]
    assert 0 < len(below) < len(PROMPTS)
    for i, prompt in enumerate(PROMPTS):
        assert out["confidence"][i] == pytest.approx(confidence[i], abs=1e-6) and out["error"][i] is None
        same = top3 if i in below else top2
        assert list(out["adapters"][i]) == list(same["adapters"][i]), prompt
        assert list(out["weights"][i]) == pytest.approx(list(same["weights"][i]), abs=1e-6), prompt
        assert out["output"][i] == same["output"][i], prompt


def test_uncertain_options_are_checked_and_named(tiny_dir, pool_dir):
    for bad in ("high", True, float("nan"), [1.0]):
        with pytest.raises(ValueError, match="uncertain_below"):
            RoutingConfig(uncertain_below=bad)
    for bad in (0, -1, 2.5, "3", True):
        with pytest.raises(ValueError, match="uncertain_k"):
            RoutingConfig(uncertain_k=bad)
    with pytest.raises(ValueError, match="uncertain_below: needs calibrated scores"):
        RoutingConfig(uncertain_below=0.5, calibration_score="raw")
    assert RoutingConfig(uncertain_below=1, uncertain_k=4).max_k == 4 and RoutingConfig(uncertain_k=4).max_k == 1
    assert RoutingConfig(k=5, uncertain_below=1.0, uncertain_k=2).max_k == 5
    assert PAPER_ROUTING["uncertain_below"] is None
    with pytest.raises(ValueError, match="max_resident=2.*3"):  # the slots must hold a widened row
        LoGoPredictor(**_options(tiny_dir, pool_dir, uncertain_below=0.0, uncertain_k=3, max_resident=2))


def test_paper_routing_has_no_confidence(tiny_dir, pool_dir):
    paper = LoGoPredictor(model=tiny_dir, adapters=pool_dir, max_new_tokens=2, device="cpu", **PAPER_ROUTING)
    out = paper({"prompt": np.array(PROMPTS[:3], dtype=object)})
    assert list(out["confidence"]) == [None] * 3 and all(len(a) == len(paper.pool) for a in out["adapters"][:3])
