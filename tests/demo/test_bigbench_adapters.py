"""The shipped BIG-bench pool: one valid LoRA adapter per pool task, fitting SmolLM2-135M, in float16,
distinct from one another, with a training report that covers every adapter; no BBH task among them."""

from __future__ import annotations

import json

import torch
from safetensors import safe_open

from actors import AdapterPool
from actors.adapters import read_adapter
from jobs.demo import BIGBENCH_ADAPTER_DIR
from jobs.demo.bigbench import BBH_TASKS, HELD_OUT_TASKS, POOL_TASKS, adapter_name
from jobs.demo.model import HIDDEN_SIZE, NUM_LAYERS
from jobs.demo.train import REPORT_NAME

NAMES = sorted(adapter_name(t) for t in POOL_TASKS)
POOL_BYTES_LIMIT = 30 * 2**20


def test_one_adapter_per_pool_task_and_nothing_else():
    dirs = sorted(p.name for p in BIGBENCH_ADAPTER_DIR.iterdir() if p.is_dir())
    assert dirs == NAMES and len(dirs) >= 24
    for name in dirs:
        files = sorted(p.name for p in (BIGBENCH_ADAPTER_DIR / name).iterdir())
        assert files == ["adapter_config.json", "adapter_model.safetensors"], name
    assert not {d.split("__")[0] for d in dirs} & (set(BBH_TASKS) | set(HELD_OUT_TASKS))


def test_pool_is_small_and_stored_in_float16():
    total = sum(p.stat().st_size for p in BIGBENCH_ADAPTER_DIR.rglob("*") if p.is_file())
    assert total < POOL_BYTES_LIMIT, f"{total / 2**20:.1f} MiB"
    for name in NAMES:
        with safe_open(str(BIGBENCH_ADAPTER_DIR / name / "adapter_model.safetensors"), framework="pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}, name


def test_every_adapter_loads_and_fits_smollm2(demo_model):
    model, _ = demo_model
    pool = AdapterPool.load(BIGBENCH_ADAPTER_DIR, model)
    assert list(pool.names) == NAMES
    for block in (0, NUM_LAYERS - 1):
        for module in ("q_proj", "v_proj"):
            path = f"model.layers.{block}.self_attn.{module}"
            assert all(e.ranks.get(path, 0) > 0 for e in pool.entries)
            assert pool.acquire([0])[0][path][0].shape[1] == HIDDEN_SIZE


def test_adapters_are_distinct():
    module = f"model.layers.{NUM_LAYERS - 1}.self_attn.q_proj"
    deltas = {}
    for n in NAMES:
        f = read_adapter(n, BIGBENCH_ADAPTER_DIR / n).factors[module]
        deltas[n] = (f.B @ f.A).flatten()
    for a in NAMES:
        for b in NAMES:
            if a < b:
                assert torch.nn.functional.cosine_similarity(deltas[a], deltas[b], dim=0) < 0.9, (a, b)


def test_training_report_covers_every_adapter():
    report = json.loads((BIGBENCH_ADAPTER_DIR / REPORT_NAME).read_text())
    assert sorted(adapter_name(t) for t in report["tasks"]) == NAMES
    assert report["command"] == "python -m jobs.demo.train --suite bigbench --task all"
    for name, entry in report["tasks"].items():
        assert entry["n_train"] > 0 and entry["n_val"] > 0 and 0.0 <= entry["adapter_em"] <= 1.0, name
    # the pool as a whole learnt its tasks' answers: mean validation EM well above the base model's
    tasks = report["tasks"].values()
    assert sum(e["adapter_em"] for e in tasks) / len(tasks) >= sum(e["base_em"] for e in tasks) / len(tasks) + 0.2
