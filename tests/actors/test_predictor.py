"""The predictor: bad rows become row errors, long prompts are truncated or refused, stops cut output."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from actors import OUTPUT_COLUMNS, LoGoPredictor


@pytest.fixture(scope="module")
def predictor(tiny_dir, pool_dir):
    return LoGoPredictor(model=tiny_dir, adapters=pool_dir, k=2, max_new_tokens=6, device="auto",
                         max_prompt_tokens=20)


def test_bad_rows_become_row_errors(predictor):
    prompts = np.array(["good one", None, "", "   ", 7, "another good one", float("nan")], dtype=object)
    out = predictor({"prompt": prompts, "id": np.arange(7)})
    assert list(out["id"]) == list(range(7)), "input columns pass through"
    errors = list(out["error"])
    assert errors[0] is None and errors[5] is None
    assert "null" in errors[1] and "empty" in errors[2] and "empty" in errors[3]
    assert "int, not a string" in errors[4] and "null" in errors[6]
    for row in (0, 5):
        assert isinstance(out["output"][row], str) and len(out["adapters"][row]) == 2
        assert out["output_tokens"][row] == 6
    for row in (1, 2, 3, 4, 6):
        assert out["output"][row] is None and out["adapters"][row] == [] and out["weights"][row] == []
    assert set(OUTPUT_COLUMNS) <= set(out)
    assert predictor.stats.errors >= 5


def test_overlong_prompt_truncated_from_left(predictor):
    long = "word " * 20
    out = predictor({"prompt": np.array([long, long[-20:]], dtype=object)})
    assert out["error"][0] is None and "truncated from the left: 100 -> 20 tokens" in out["warning"][0]
    assert out["prompt_tokens"][0] == 20 and out["warning"][1] is None
    # Truncation keeps the last 20 tokens, which is exactly the second prompt.
    assert out["output"][0] == out["output"][1] and out["adapters"][0] == out["adapters"][1]


def test_overlong_prompt_as_error(tiny_dir, pool_dir):
    strict = LoGoPredictor(model=tiny_dir, adapters=pool_dir, k=2, max_new_tokens=4, device="cpu",
                           max_prompt_tokens=10, overlong="error")
    out = strict({"prompt": np.array(["x" * 11, "x" * 10], dtype=object)})
    assert "11 tokens, more than the 10 allowed" in out["error"][0] and out["output"][0] is None
    assert out["error"][1] is None and out["output"][1] is not None


def test_context_limit_applies_without_max_prompt_tokens(tiny_dir, pool_dir):
    predictor = LoGoPredictor(model=tiny_dir, adapters=pool_dir, k=1, max_new_tokens=12, device="cpu")
    assert predictor.max_prompt_tokens == 512 - 12
    out = predictor({"prompt": np.array(["y" * 600], dtype=object)})
    assert out["prompt_tokens"][0] == 500 and "600 -> 500" in out["warning"][0]


def test_stop_strings_and_newline(tiny_dir, pool_dir, predictor):
    prompts = np.array(["good one", "another good one", "abc", "x"], dtype=object)
    free = LoGoPredictor(model=tiny_dir, adapters=pool_dir, k=2, max_new_tokens=30, device="cpu")
    full = free({"prompt": prompts})["output"]
    # Stop at the third character of each free-running output: the output is cut before it.
    for row, text in enumerate(full):
        stop = text[2]
        stopped = LoGoPredictor(model=tiny_dir, adapters=pool_dir, k=2, max_new_tokens=30, device="cpu",
                                stop_strings=[stop])
        out = stopped({"prompt": prompts[row : row + 1]})
        assert out["output"][0] == text[: text.index(stop)]
        assert out["output_tokens"][0] <= text.index(stop) + 1 < 30
    newline = LoGoPredictor(model=tiny_dir, adapters=pool_dir, k=2, max_new_tokens=30, device="cpu",
                            stop_at_newline=True)
    for text, cut in zip(full, newline({"prompt": prompts})["output"]):
        assert cut == text.split("\n")[0] and "\n" not in cut


def test_missing_prompt_column(predictor):
    with pytest.raises(KeyError, match="no column 'prompt'; columns: \\['text'\\]"):
        predictor({"text": np.array(["a"], dtype=object)})


def test_actors_does_not_import_ray():
    code = "import sys, actors, actors.predictor; print('ray' in sys.modules, 'ray.data' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_an_empty_output_after_truncation_says_why(tiny_dir, pool_dir):
    """A truncated prompt whose output comes out empty carries a warning naming both."""
    long = "word " * 20
    plain = LoGoPredictor(model=tiny_dir, adapters=pool_dir, k=2, max_new_tokens=6, device="cpu",
                          max_prompt_tokens=20)
    first = plain({"prompt": np.array([long], dtype=object)})["output"][0]
    assert first, "the tiny model writes something for this prompt"
    # a stop string equal to the output's first character leaves the output empty
    stopped = LoGoPredictor(model=tiny_dir, adapters=pool_dir, k=2, max_new_tokens=6, device="cpu",
                            max_prompt_tokens=20, stop_strings=(first[0],))
    out = stopped({"prompt": np.array([long, long[-20:]], dtype=object)})
    assert out["output"][0] == "" and out["output"][1] == ""
    assert out["warning"][0].startswith("prompt truncated from the left: 100 -> 20 tokens; output is empty after "
                                        "the prompt was truncated (20 tokens kept)")
    assert out["warning"][1] is None, "an empty output of a prompt kept whole is no truncation's doing"
