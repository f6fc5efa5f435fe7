"""The shipped adapter pool: one valid LoRA adapter per task, fitting SmolLM2-135M, small, and better
than the base model on its own task (as recorded by the training run)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from actors import AdapterPool
from actors.adapters import read_adapter
from jobs.demo.model import HIDDEN_SIZE, NUM_LAYERS
from jobs.demo.tasks import TASK_NAMES
from jobs.demo.train import ADAPTER_DIR, REPORT_NAME

POOL_BYTES_LIMIT = 15 * 2**20


def test_one_adapter_per_task_and_nothing_else():
    dirs = sorted(p.name for p in ADAPTER_DIR.iterdir() if p.is_dir())
    assert dirs == sorted(TASK_NAMES)
    for name in dirs:
        files = sorted(p.name for p in (ADAPTER_DIR / name).iterdir())
        assert files == ["adapter_config.json", "adapter_model.safetensors"], name


def test_pool_is_small_and_stored_in_float16():
    total = sum(p.stat().st_size for p in ADAPTER_DIR.rglob("*") if p.is_file())
    assert total < POOL_BYTES_LIMIT, f"{total / 2**20:.1f} MiB"
    for name in TASK_NAMES:
        with safe_open(str(ADAPTER_DIR / name / "adapter_model.safetensors"), framework="pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}, name


def test_every_adapter_loads_and_fits_smollm2(demo_model):
    model, _ = demo_model
    assert model.config.hidden_size == HIDDEN_SIZE and model.config.num_hidden_layers == NUM_LAYERS
    pool = AdapterPool.load(ADAPTER_DIR, model)
    assert pool.names == tuple(sorted(TASK_NAMES))
    # q_proj and v_proj of every block, for every adapter
    for block in range(NUM_LAYERS):
        for module in ("q_proj", "v_proj"):
            path = f"model.layers.{block}.self_attn.{module}"
            assert all(e.ranks.get(path, 0) > 0 for e in pool.entries)
            assert pool.acquire([0])[0][path][0].shape[1] == HIDDEN_SIZE
    assert all(p.requires_grad is False for p in model.parameters()), "the pool must not touch the model"


def test_adapters_are_distinct():
    factors = {n: read_adapter(n, ADAPTER_DIR / n).factors for n in TASK_NAMES}
    module = f"model.layers.{NUM_LAYERS - 1}.self_attn.q_proj"
    deltas = {n: (f[module].B @ f[module].A).flatten() for n, f in factors.items()}
    for a in TASK_NAMES:
        for b in TASK_NAMES:
            if a < b:
                cos = torch.nn.functional.cosine_similarity(deltas[a], deltas[b], dim=0)
                assert cos < 0.9, (a, b, float(cos))


def test_training_report_shows_every_adapter_beats_the_base_model():
    report = json.loads((ADAPTER_DIR / REPORT_NAME).read_text())
    assert sorted(report["tasks"]) == sorted(TASK_NAMES)
    for name, entry in report["tasks"].items():
        assert entry["adapter_em"] >= entry["base_em"] + 0.2, (name, entry)
    assert report["train_config"]["target_modules"] == ["q_proj", "v_proj"]


@pytest.mark.parametrize("name", ["word_order_reversal"])
def test_a_shipped_adapter_solves_its_task(demo_model, name):
    """Greedy generation with one adapter (via the engine) answers most of a few held-out prompts."""
    import copy

    from actors import GenerationConfig, LoGoEngine, RoutingConfig
    from jobs.demo.data import check_row, task_split
    from jobs.demo.methods import fixed_routing
    from jobs.demo.tasks import extract_answer

    model, tokenizer = demo_model
    engine_model = copy.deepcopy(model)
    pool = AdapterPool.load(ADAPTER_DIR, engine_model)
    engine = LoGoEngine(engine_model, tokenizer, pool, RoutingConfig(k=1, calibration_score="raw"),
                        GenerationConfig(max_new_tokens=12, stop_at_newline=True))
    rows = task_split(name, "test")[:8]
    seqs = [tokenizer(r["prompt"])["input_ids"] for r in rows]
    with_adapter, _, _ = engine.generate(seqs, [fixed_routing(engine, [name]) for _ in rows])
    without, _, _ = engine.generate(seqs, [fixed_routing(engine, []) for _ in rows])
    hits = sum(check_row(r, extract_answer(t)) for r, t in zip(rows, with_adapter))
    base_hits = sum(check_row(r, extract_answer(t)) for r, t in zip(rows, without))
    assert hits >= 6 and hits > base_hits, (with_adapter, without)
