"""Routing (LOGO_SPEC section 1) against a direct computation from hidden states and raw factors."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from actors import AdapterPool, LoGoPredictor, Router, RoutingConfig
from actors.base import load_base
from tests.actors.conftest import POOL, PROMPTS


def direct_routing(model, pool_dir, ids, config: RoutingConfig):
    """Steps 1-6 from output_hidden_states of the plain base model and the safetensors files."""
    n_layers = model.config.num_hidden_layers
    T = config.probe_layer % n_layers
    with torch.no_grad():
        hidden = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[T][0, -1]
        if config.probe_input == "module_input":
            hidden = model.model.layers[T].input_layernorm(hidden)
    scores = {}
    for name in sorted(POOL):
        cfg = json.loads((pool_dir / name / "adapter_config.json").read_text())
        tensors = load_file(pool_dir / name / "adapter_model.safetensors")
        key = f"base_model.model.model.layers.{T}.self_attn.{config.probe_module}"
        if f"{key}.lora_A.weight" not in tensors:
            scores[name] = 0.0
            continue
        A, B = tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"]
        r = A.shape[0]
        c = cfg["lora_alpha"] / (math.sqrt(r) if cfg["use_rslora"] else r)
        o = c * (B @ (A @ hidden))
        if config.signal == "norm":
            scores[name] = float(o.norm())
        else:
            p = torch.softmax(o, dim=-1)
            scores[name] = float(1.0 / (-(p * torch.log(p + 1e-8)).sum() + 1e-6))
    chosen = sorted(scores, key=lambda n: (-scores[n], n))[: min(config.k, len(scores))]
    total = sum(scores[n] for n in chosen)
    return chosen, [scores[n] / total for n in chosen]


@pytest.fixture(scope="module")
def plain_model(tiny_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def base_and_pool(tiny_dir, pool_dir):
    model, tokenizer = load_base(tiny_dir, torch.float32, torch.device("cpu"))
    return model, tokenizer, AdapterPool.load(pool_dir, model)


@pytest.mark.parametrize("signal", ["norm", "entropy"])
@pytest.mark.parametrize("probe_input", ["residual", "module_input"])
@pytest.mark.parametrize("probe", [(-1, "q_proj"), (2, "v_proj")])
def test_routing_equals_direct_computation(plain_model, base_and_pool, pool_dir, signal, probe_input, probe):
    model, tokenizer, pool = base_and_pool
    config = RoutingConfig(k=3, signal=signal, probe_input=probe_input, probe_layer=probe[0], probe_module=probe[1])
    router = Router(model, pool, config)
    seqs = [tokenizer(p)["input_ids"] for p in PROMPTS[:8]]
    width = max(map(len, seqs))
    ids = torch.tensor([[0] * (width - len(s)) + s for s in seqs])
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])
    for seq, routing in zip(seqs, router.route(ids, mask)):
        names, weights = direct_routing(plain_model, pool_dir, seq, config)
        assert list(routing.adapters) == names
        assert routing.weights == pytest.approx(weights, rel=1e-4)
        assert sum(routing.weights) == pytest.approx(1.0)


def test_probe_stops_at_block_T(base_and_pool):
    model, tokenizer, pool = base_and_pool
    calls = []
    hooks = [model.model.layers[i].register_forward_hook(lambda *a, i=i: calls.append(i)) for i in range(4)]
    hooks.append(model.lm_head.register_forward_hook(lambda *a: calls.append("lm_head")))
    try:
        for probe_input in ("residual", "module_input"):
            router = Router(model, pool, RoutingConfig(k=2, probe_layer=1, probe_input=probe_input))
            ids = torch.tensor([tokenizer("hello")["input_ids"]])
            router.route(ids, torch.ones_like(ids))
            assert calls == [0], calls  # only block 0 completes; block 1 is entered, never finished
            calls.clear()
    finally:
        for h in hooks:
            h.remove()
    assert not model.model.layers[1]._forward_pre_hooks, "the probe hook must be removed"


def test_ties_are_broken_by_name(base_and_pool):
    model, _, pool = base_and_pool
    router = Router(model, pool, RoutingConfig(k=3))
    n = len(pool)
    scores = torch.tensor([[1.0] * n, [0.0] * n, [2.0] + [1.0] * (n - 1)])
    a, b, c = router.select(scores)
    assert a.adapters == pool.names[:3] and a.weights == pytest.approx((1 / 3,) * 3)
    assert b.uniform_fallback and b.weights == pytest.approx((1 / 3,) * 3)
    assert not a.uniform_fallback
    assert c.adapters == (pool.names[0], pool.names[1], pool.names[2])
    assert c.weights == pytest.approx((0.5, 0.25, 0.25))


def test_adapter_without_probe_module_scores_zero(base_and_pool):
    model, tokenizer, pool = base_and_pool
    router = Router(model, pool, RoutingConfig(k=len(pool)))
    ids = torch.tensor([tokenizer("hello there")["input_ids"]])
    scores = router.scores(router.probe(ids, torch.ones_like(ids)))
    lacking = pool.index("d_first_layers")
    assert scores[0, lacking] == 0 and (scores[0, torch.arange(len(pool)) != lacking] > 0).all()
    (routing,) = router.route(ids, torch.ones_like(ids))
    assert routing.adapters[-1] == "d_first_layers" and routing.weights[-1] == 0.0


def test_k_is_clamped_to_pool_size(tiny_dir, pool_dir):
    predictor = LoGoPredictor(model=tiny_dir, adapters=pool_dir, k=50, max_new_tokens=2, device="cpu")
    (routing,) = predictor.engine.route([predictor.encode("hello")[0]])
    assert len(routing.adapters) == len(POOL)
