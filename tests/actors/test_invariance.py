"""Routing is a pure function of the row: alone, in a batch, in any order, with any padding side."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from actors import LoGoPredictor
from actors.options import PAPER_ROUTING
from tests.actors.conftest import PROMPTS


@pytest.fixture(scope="module")
def predictor(tiny_dir, pool_dir):
    return LoGoPredictor(model=tiny_dir, adapters=pool_dir, k=3, max_new_tokens=12, device="cpu")


@pytest.fixture(scope="module")
def paper(tiny_dir, pool_dir):
    return LoGoPredictor(model=tiny_dir, adapters=pool_dir, max_new_tokens=12, device="cpu", **{**PAPER_ROUTING, "k": 3})


# The probe's hidden states agree across batch shapes to float32 rounding; raw weights keep that
# (1e-6), z-scores divide it by each adapter's spread over the calibration prompts (1e-4).
@pytest.mark.parametrize("which,tolerance", [("paper", 1e-6), ("predictor", 1e-4)])
def test_routing_independent_of_batch_order_and_padding(request, which, tolerance):
    predictor = request.getfixturevalue(which)
    engine = predictor.engine
    seqs = [predictor.encode(p)[0] for p in PROMPTS]
    assert len(seqs) == 16 and len(set(map(len, seqs))) > 8
    alone = [engine.route([s])[0] for s in seqs]
    single = torch.cat([engine.router.raw_scores(engine.router.probe(*engine.pad([s]))) for s in seqs])
    for side in ("left", "right"):
        batch = engine.router.route(*engine.pad(seqs, side))
        reverse = engine.router.route(*engine.pad(seqs[::-1], side))[::-1]
        for a, b, c in zip(alone, batch, reverse):
            assert a.adapters == b.adapters == c.adapters
            assert b.weights == pytest.approx(a.weights, abs=tolerance)
            assert c.weights == pytest.approx(a.weights, abs=tolerance)
        raw = engine.router.raw_scores(engine.router.probe(*engine.pad(seqs, side)))  # (16, P, N)
        torch.testing.assert_close(raw, single, rtol=1e-4, atol=1e-6)
    assert len({r.adapters for r in alone}) > 2, "the prompts should not all route alike"


@pytest.mark.parametrize("which,tolerance", [("paper", 1e-6), ("predictor", 1e-4)])
def test_output_independent_of_batch(request, which, tolerance):
    predictor = request.getfixturevalue(which)
    prompts = np.array(PROMPTS, dtype=object)
    batch = predictor({"prompt": prompts})
    assert predictor.last_stats.union_sizes[0] > 3, "the rows of a call should select different adapters"
    reverse = predictor({"prompt": prompts[::-1].copy()})
    for i, prompt in enumerate(PROMPTS):
        alone = predictor({"prompt": np.array([prompt], dtype=object)})
        for out, j in ((batch, i), (reverse, len(PROMPTS) - 1 - i)):
            assert out["output"][j] == alone["output"][0], f"row {prompt!r}"
            assert out["adapters"][j] == alone["adapters"][0]
            assert out["weights"][j] == pytest.approx(alone["weights"][0], abs=tolerance)
            assert out["error"][j] is None


def test_the_generate_calls_a_batch_is_cut_into_do_not_change_outputs(tiny_dir, pool_dir, predictor):
    options = dict(model=tiny_dir, adapters=pool_dir, k=3, max_new_tokens=12, device="cpu")
    one = LoGoPredictor(**options, generate_step_slots=float("inf"))  # one call for the batch
    many = LoGoPredictor(**options, generate_step_slots=0.0)  # a call per prompt length
    prompts = np.array(PROMPTS, dtype=object)
    a, b = one({"prompt": prompts}), many({"prompt": prompts})
    assert one.last_stats.calls == 1 and many.last_stats.calls > 8
    assert list(a["output"]) == list(b["output"])


@pytest.fixture(scope="module")
def pool_64(tiny_dir, tmp_path_factory):
    from tests.tiny import tiny_pool

    return tiny_pool(tiny_dir, tmp_path_factory.mktemp("pool-64"), 64, seed=7)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_routing_is_a_function_of_the_row_in_every_dtype(tiny_dir, pool_64, dtype):
    """48 prompts at k = 20 of 64: a row alone, in a batch and in a shuffled batch gets the same
    adapters and weights (bfloat16 and float16 probe rows of one length together, unpadded)."""
    prompts = [f"{p} #{i}" for i in range(3) for p in PROMPTS]
    predictor = LoGoPredictor(model=tiny_dir, adapters=pool_64, k=20, max_new_tokens=1, device="cpu", dtype=dtype,
                              calibration_prompts=PROMPTS)
    order = np.random.default_rng(1).permutation(len(prompts))
    batch = predictor({"prompt": np.array(prompts, dtype=object)})
    shuffled = predictor({"prompt": np.array([prompts[i] for i in order], dtype=object)})
    back = {c: [None] * len(prompts) for c in ("adapters", "weights")}
    for j, i in enumerate(order):
        for c in back:
            back[c][i] = shuffled[c][j]
    for i, prompt in enumerate(prompts):
        alone = predictor({"prompt": np.array([prompt], dtype=object)})
        assert len(alone["adapters"][0]) == 20
        for out in (batch, back):
            assert out["adapters"][i] == alone["adapters"][0], f"row {prompt!r} in {dtype}"
            assert out["weights"][i] == pytest.approx(alone["weights"][0], abs=2e-3)
