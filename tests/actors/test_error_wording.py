"""Error-row messages are worded alike: `prompt <what is wrong>; <the fix>`, naming the column."""

from __future__ import annotations

import re

import numpy as np

from actors import LoGoPredictor

WORDING = re.compile(r"^prompt [^;]+; (give|store|shorten) .*")


def test_every_bad_prompt_error_says_what_and_how_to_fix(tiny_dir, pool_dir):
    predictor = LoGoPredictor(model=tiny_dir, adapters=pool_dir, k=2, max_new_tokens=2, max_prompt_tokens=20,
                              overlong="error", prompt_column="question")
    prompts = np.array([None, "", "   ", 7, float("nan"), "word " * 20], dtype=object)
    errors = list(predictor({"question": prompts})["error"])
    assert all(e is not None for e in errors)
    for message in errors:
        assert WORDING.match(message), message
    for message in errors[:5]:
        assert "column 'question'" in message, message
