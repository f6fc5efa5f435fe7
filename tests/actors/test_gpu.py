"""Checks for a CUDA machine (marker `gpu`; `pytest -m gpu tests/actors/test_gpu.py`): grouped_mm in
bfloat16 equals the reference there, a decode step adds no host synchronisation and a fixed number
of ops, and `max_resident: auto` sizes the slots to the free memory."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from actors import AdapterPool, GenerationConfig, LoGoEngine, LoGoPredictor, RoutingConfig
from actors.base import load_base
from actors.mixture import SlotMix, mixture_add_, mixture_reference
from tests.actors import test_dispatch as D
from tests.actors.test_mixture import random_case
from tests.tiny import tiny_model_dir, tiny_pool

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
CUDA = torch.device("cuda")


@pytest.mark.parametrize("T", [1, 3, 17])
def test_bfloat16_slot_mixture_on_cuda_equals_the_reference(T):
    x, factors, weights, A, B, (slots, w), n_slots = random_case(3, rows=10, T=T)
    mix = SlotMix(slots, w, n_slots, CUDA, torch.bfloat16)
    assert mix.grouped
    y = torch.zeros(x.shape[0], T, B.shape[2], dtype=torch.bfloat16, device=CUDA)
    mixture_add_(y, x.to(CUDA, torch.bfloat16), A.to(CUDA, torch.bfloat16).transpose(1, 2),
                 B.to(CUDA, torch.bfloat16), mix)
    expected = mixture_reference(x, factors, weights)
    assert (y.float().cpu() - expected).abs().max() <= 0.05 * expected.abs().max()


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    model_dir = tiny_model_dir(tmp_path_factory.mktemp("gpu") / "llama3", layers=3)
    pool_dir = tiny_pool(model_dir, tmp_path_factory.mktemp("gpu-pool"), D.N_ADAPTERS, seed=5)
    model, tokenizer = load_base(model_dir, torch.bfloat16, CUDA)
    pool = AdapterPool.load(pool_dir, model, dtype=torch.bfloat16, device=CUDA)
    return LoGoEngine(model, tokenizer, pool, RoutingConfig(k=20, calibration_score="raw"),
                      GenerationConfig(max_new_tokens=4))


def test_a_cuda_decode_step_adds_fixed_ops_and_no_sync(engine):
    base = D.base_step(engine)
    layers = len(engine.pool.modules)
    for name in D.WORKLOADS:
        routings = D.workload(engine, name)
        per_layer = D.layer_ops(engine, routings)
        step = D.engine_step(engine, routings)
        assert per_layer <= 10 and step.total - base.total - per_layer * layers <= 0.1 * base.total, name
        assert step.syncs == base.syncs, name
        print(f"{name}: {per_layer} ops per adapted layer, {step.total - base.total:.0f} added per step")


def test_auto_residency_takes_the_free_memory_less_the_headroom(tmp_path):
    model_dir = tiny_model_dir(tmp_path / "m")
    pool_dir = tiny_pool(model_dir, tmp_path / "pool", 8, seed=1)
    predictor = LoGoPredictor(model_dir, pool_dir, k=2, max_new_tokens=2, device="cuda", max_resident="auto",
                              memory_headroom=0.5)
    pool = predictor.pool
    assert pool.bound.describe() == "auto" and pool.slots == 8  # a tiny pool fits in half the device
    free, total = torch.cuda.mem_get_info()
    assert free >= 0.4 * total - pool.storage_nbytes
    assert pool.budget_lines() and "KV cache" in pool.budget_lines()[0]
    predictor({"prompt": np.array(["a b c", "d e"], dtype=object)})
    memory = predictor.batching()
    assert 0 < memory["peak_device_bytes"] <= memory["peak_device_budget_bytes"]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_two_gpus_spread_the_model_and_give_the_same_outputs(tmp_path):
    """`gpus=2`: the model over two devices (a device map), each module's slots beside it, the
    routing index on the first; outputs and routing as on one device."""
    model_dir = tiny_model_dir(tmp_path / "m", layers=4)
    pool_dir = tiny_pool(model_dir, tmp_path / "pool", 8, seed=1)
    options = dict(k=3, max_new_tokens=6, device="cuda", dtype="float32", calibration_prompts=["a b", "c d e"])
    one = LoGoPredictor(model_dir, pool_dir, **options)
    two = LoGoPredictor(model_dir, pool_dir, gpus=2, **options)
    assert len(two.pool.devices) == 2
    for m in two.pool.modules:
        assert two.pool.A[m].device == two.engine.model.get_submodule(m).weight.device
    prompts = {"prompt": np.array(["a b c", "d e", "f g h i"], dtype=object)}
    a, b = one(dict(prompts)), two(dict(prompts))
    assert list(a["output"]) == list(b["output"]) and list(a["adapters"]) == list(b["adapters"])
