"""Generation batches: selection order and length-split generate calls."""

from __future__ import annotations

import numpy as np
import pytest

from actors import LoGoPredictor
from actors.batching import generation_batches
from tests.actors.conftest import PROMPTS


def test_selection_order_puts_equal_selections_together_and_input_order_keeps_rows():
    selections = [(3, 1), (0, 2), (3, 1), (0, 2), (5, 4), (3, 1)]
    lengths = [9, 4, 2, 7, 1, 5]
    assert generation_batches(lengths, selections, 4, "input") == [[0, 1, 2, 3], [4, 5]]
    batches = generation_batches(lengths, selections, 3, "selection")
    assert batches == [[1, 3, 2], [5, 0, 4]]  # (0, 2) first, then (3, 1) by length, then (5, 4)
    assert sorted(r for b in batches for r in b) == list(range(6))
    with pytest.raises(ValueError, match="ordering='random' is not known"):
        generation_batches(lengths, selections, 3, "random")


@pytest.fixture(scope="module")
def predictor(tiny_dir, pool_dir):
    return LoGoPredictor(model=tiny_dir, adapters=pool_dir, k=3, max_new_tokens=4, device="cpu")


def test_one_long_prompt_runs_in_its_own_generate_call(predictor):
    long = "a long prompt, " * 25  # 375 characters: tokens of the character-level tokenizer
    rows = PROMPTS[:7] + [long] + PROMPTS[7:15]
    out = predictor({"prompt": np.array(rows, dtype=object)})
    stats = predictor.last_stats
    assert stats.calls >= 2 and (7,) in stats.decode_groups  # the 375-token row alone
    alone = predictor({"prompt": np.array([long], dtype=object)})
    assert out["output"][7] == alone["output"][0] and out["adapters"][7] == alone["adapters"][0]
    short = predictor({"prompt": np.array(rows[:7] + rows[8:], dtype=object)})
    assert list(out["output"][:7]) + list(out["output"][8:]) == list(short["output"])
