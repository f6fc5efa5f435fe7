"""Shared fixtures for the engine tests: one tiny model and one varied adapter pool per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.tiny import tiny_adapter, tiny_model_dir

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# name -> tiny_adapter options: mixed ranks and alphas, rsLoRA, different module sets, one adapter
# (d_first_layers) that lacks the probe module of the last block.
POOL = {
    "a_attn": dict(r=4, alpha=8, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"), seed=1),
    "b_qv": dict(r=8, alpha=16, target_modules=("q_proj", "v_proj"), seed=2),
    "c_rslora": dict(r=2, alpha=4, target_modules=ALL, use_rslora=True, seed=3),
    "d_first_layers": dict(r=4, alpha=32, target_modules=("q_proj",), layers_to_transform=[0, 1], seed=4),
    "e_mlp": dict(r=6, alpha=6, target_modules=("q_proj", "gate_proj", "up_proj", "down_proj"), seed=5),
    "f_big": dict(r=4, alpha=8, target_modules=("q_proj", "v_proj", "o_proj"), seed=6, b_scale=2.0),
}

PROMPTS = [
    "hello there", "2+2=", "Translate: cat", "The quick brown fox", "sort: 3 1 2", "abc",
    "What is the capital of France?", "x", "reverse this word: banana", "count the letters in apple",
    "A much longer prompt that goes on for a while, with commas, numbers 12345 and more words",
    "Q: yes or no?", "list: 9 8 7 6", "{\"json\": true}", "tabs\tand spaces", "end.",
]


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return tiny_model_dir(tmp_path_factory.mktemp("model") / "tiny-llama")


@pytest.fixture(scope="session")
def pool_dir(tiny_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pool")
    for name, options in POOL.items():
        tiny_adapter(tiny_dir, root / name, **options)
    return root
