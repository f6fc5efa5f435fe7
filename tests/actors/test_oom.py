"""Out of device memory splits the work: a probe pass or generate call is halved down to one row,
and a row that does not fit alone becomes an error row; every other row is as without the shortage."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from actors import LoGoPredictor
from tests.actors.conftest import PROMPTS

COLUMNS = ("output", "adapters", "error")  # and weights, to the probe's float32 rounding across pass widths


@pytest.fixture(scope="module")
def predictor(tiny_dir, pool_dir):
    return LoGoPredictor(model=tiny_dir, adapters=pool_dir, k=3, max_new_tokens=6, device="cpu", batch_size=16,
                         probe_bucket_overhead=float("inf"), generate_step_slots=float("inf"))


def short_of_memory(monkeypatch, predictor, too_big):
    """The decoder's forward (probe and generation alike) raises OutOfMemoryError when `too_big(ids)`."""
    inner = predictor.engine.model.model
    forward = inner.forward

    def tight(*args, **kwargs):
        ids = kwargs.get("input_ids")
        ids = kwargs["inputs_embeds"] if ids is None else ids
        if too_big(ids):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return forward(*args, **kwargs)

    monkeypatch.setattr(inner, "forward", tight)


def same(out, expected, skip=None):
    rows = [i for i in range(len(out["output"])) if i != skip]
    for c in COLUMNS:
        assert [out[c][i] for i in rows] == [expected[c][i] for i in rows], c
    for i in rows:
        assert out["weights"][i] == pytest.approx(expected["weights"][i], abs=1e-4)


def test_more_than_four_rows_out_of_memory_gives_every_row_as_without(predictor, monkeypatch):
    prompts = np.array(PROMPTS, dtype=object)
    expected = predictor({"prompt": prompts})
    assert all(e is None for e in expected["error"])
    before = predictor.batching()["oom_splits"]
    short_of_memory(monkeypatch, predictor, lambda ids: ids.shape[0] > 4)
    out = predictor({"prompt": prompts})
    same(out, expected)
    # 16 rows -> 8 + 8 -> four passes of 4, in the probe and in generation: 3 halvings each
    assert predictor.batching()["oom_splits"] - before == 6
    assert predictor.last_stats.calls == 4


def test_a_row_out_of_memory_alone_is_an_error_naming_its_prompt_length(predictor, monkeypatch):
    prompts = np.array(PROMPTS, dtype=object)
    expected = predictor({"prompt": prompts})
    long = max(range(len(PROMPTS)), key=lambda i: len(PROMPTS[i]))
    tokens = len(predictor.encode(PROMPTS[long])[0])
    short_of_memory(monkeypatch, predictor, lambda ids: ids.shape[1] > 40)
    assert tokens > 40 > max(len(predictor.encode(p)[0]) for i, p in enumerate(PROMPTS) if i != long)
    out = predictor({"prompt": prompts})
    assert out["error"][long] == (f"out of device memory routing this row alone ({tokens} prompt tokens, "
                                  "max_new_tokens=6): shorten the prompt (max_prompt_tokens), lower max_new_tokens, "
                                  "or give the actor a device with more memory")
    assert out["output"][long] is None and out["adapters"][long] == []
    same(out, expected, skip=long)
