"""The confidence study on a tiny model: every row and source measured, both sweeps consistent with
the rows they are computed from (the fallback and the per-row k that set the defaults)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from jobs.demo.confidence_study import THRESHOLDS, UNCERTAIN_KS, em_with_threshold, study
from tests.tiny import tiny_adapter, tiny_model_dir


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    root = tmp_path_factory.mktemp("confstudy")
    model_dir = tiny_model_dir(root / "model")
    names = [f"t{i}" for i in range(6)]
    for i, name in enumerate(names):
        tiny_adapter(model_dir, root / "pool" / name, target_modules=("q_proj", "v_proj"), seed=i)
    rows = [{"task": names[i % 6] if i < 12 else "held", "prompt": f"question {i} about {names[i % 6]}\nAnswer:"}
            for i in range(16)]
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return rows, study(model, tokenizer, rows, lambda row, text: len(text) % 2 == 0, root / "pool",
                       sources=("input",), sample=8, max_new_tokens=3, batch_size=8, log=lambda _: None)


def test_every_row_and_setting_is_measured(measured):
    rows, out = measured
    entry = out["sources"]["input"]
    for setting in ("pool", "leave-one-out"):
        assert len(entry[setting]["routed"]) == len(entry[setting]["confidence"]) == len(rows)
        assert set(entry[setting]["wide"]) == {str(w) for w in UNCERTAIN_KS}
    own = [out["adapters"].index(r["task"]) if r["task"] != "held" else None for r in rows]
    assert all(t != o for t, o in zip(entry["leave-one-out"]["top1"], own) if o is not None)


def test_the_sweeps_follow_their_rows(measured):
    rows, out = measured
    entry = out["sources"]["input"]
    inside = [i for i, r in enumerate(rows) if r["task"] != "held"]
    off = entry["sweep"]["confidence None"]
    assert off["pool_fallback"] == 0.0 and off["pool_em"] == round(sum(entry["pool"]["routed"][i] for i in inside) / 12, 4)
    for w in UNCERTAIN_KS:
        shares = [entry["sweep"][f"uncertain_k={w} {t}"]["pool_widened"] for t in THRESHOLDS[1:]]
        assert shares == sorted(shares)
        t = THRESHOLDS[-1]
        em, _ = em_with_threshold(entry["pool"], entry["pool"]["wide"][str(w)], "confidence", t, inside)
        assert entry["sweep"][f"uncertain_k={w} {t}"]["pool_em"] == round(em, 4)
