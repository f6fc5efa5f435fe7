"""Routing (LOGO_SPEC section 1) against a direct computation from hidden states and raw factors."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from actors import AdapterPool, LoGoPredictor, Router, RoutingConfig, read_adapter
from actors.base import load_base
from tests.actors.conftest import POOL, PROMPTS
from tests.tiny import tiny_adapter


def direct_scores(model, pool_dir, ids, config: RoutingConfig, pool=POOL):
    """LOGO_SPEC 1.1-1.4 at every (block, module) pair, from output_hidden_states of the plain base
    model and the safetensors files. Returns (pairs, {name: [score per pair or None if absent]})."""
    n_layers = model.config.num_hidden_layers
    blocks = config.blocks(n_layers)
    with torch.no_grad():
        states = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
    files = {name: (json.loads((pool_dir / name / "adapter_config.json").read_text()),
                    load_file(pool_dir / name / "adapter_model.safetensors")) for name in sorted(pool)}
    pairs, scores = [], {name: [] for name in files}
    for T in blocks:
        hidden = states[T][0, -1]
        if config.probe_input == "module_input":
            hidden = model.model.layers[T].input_layernorm(hidden)
        for module in config.probe_modules:
            key = f"base_model.model.model.layers.{T}.self_attn.{module}"
            if not any(f"{key}.lora_A.weight" in t for _, t in files.values()):
                continue
            pairs.append(f"model.layers.{T}.self_attn.{module}")
            for name, (cfg, tensors) in files.items():
                if f"{key}.lora_A.weight" not in tensors:
                    scores[name].append(None)
                    continue
                A, B = tensors[f"{key}.lora_A.weight"].float(), tensors[f"{key}.lora_B.weight"].float()
                r = A.shape[0]
                c = cfg["lora_alpha"] / (math.sqrt(r) if cfg["use_rslora"] else r)
                o = c * (B @ (A @ hidden.float()))
                if config.signal == "norm":
                    scores[name].append(float(o.norm()))
                else:
                    p = torch.softmax(o, dim=-1)
                    scores[name].append(float(1.0 / (-(p * torch.log(p + 1e-8)).sum() + 1e-6)))
    return pairs, scores


def direct_routing(model, pool_dir, ids, config: RoutingConfig, stats=None, pool=POOL):
    """LOGO_SPEC sections 1 and 5 written out: per-pair (calibrated) scores, an adapter absent at a pair
    gets the pair's floor min(0, min of the present), summed; top k with absent-everywhere adapters
    last and ties by name; weights s_i / sum_S s_j over scores clamped at 0. Per-row k: a row whose
    confidence (top calibrated score per pair) is below `uncertain_below` takes the top
    `uncertain_k` instead (the pool here holds every adapter resident)."""
    pairs, raw = direct_scores(model, pool_dir, ids, config, pool)
    names = sorted(raw)
    cal = {n: [] for n in names}
    for p in range(len(pairs)):
        for j, name in enumerate(names):
            s = raw[name][p]
            if s is not None and stats is not None:
                mean, std = stats.mean[p][j], stats.std[p][j]
                ok = mean > 0 if config.calibration_score == "ratio" else std > 0
                s = None if not ok else (s / mean if config.calibration_score == "ratio" else (s - mean) / std)
            cal[name].append(s)
        floor = min([0.0] + [cal[n][p] for n in names if cal[n][p] is not None])
        for name in names:
            if cal[name][p] is None:
                cal[name][p] = ("absent", floor)
    total = {n: sum(v[1] if isinstance(v, tuple) else v for v in cal[n]) for n in names}
    rankable = {n: any(not isinstance(v, tuple) for v in cal[n]) for n in names}
    k = config.k
    threshold = config.uncertain_below
    if threshold is not None and stats is not None:
        confidence = max(total[n] for n in names if rankable[n]) / len(pairs)
        confidence -= 1.0 if config.calibration_score == "ratio" else 0.0
        if confidence < threshold:
            k = max(k, config.uncertain_k)
    chosen = sorted(names, key=lambda n: (not rankable[n], -total[n], n))[: min(k, len(names))]
    kept = [max(total[n], 0.0) for n in chosen]
    if sum(kept) <= 0:  # every selected score <= 0: uniform weights
        return chosen, [1.0 / len(chosen)] * len(chosen)
    return chosen, [v / sum(kept) for v in kept]


@pytest.fixture(scope="module")
def plain_model(tiny_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def base_and_pool(tiny_dir, pool_dir):
    model, tokenizer = load_base(tiny_dir, torch.float32, torch.device("cpu"))
    return model, tokenizer, AdapterPool.load(pool_dir, model, index_with_B=True)


@pytest.mark.parametrize("signal", ["norm", "entropy"])
@pytest.mark.parametrize("probe_input", ["residual", "module_input"])
@pytest.mark.parametrize("probe", [(-1, "q_proj"), (2, "v_proj"), ("all", ("q_proj", "v_proj")), ((0, -1), "q_proj")])
def test_routing_equals_direct_computation(plain_model, base_and_pool, pool_dir, signal, probe_input, probe):
    model, tokenizer, pool = base_and_pool
    config = RoutingConfig(k=3, signal=signal, probe_input=probe_input, probe_layers=probe[0], probe_module=probe[1],
                           calibration_score="raw")
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


@pytest.mark.parametrize("layers,deepest", [(1, 1), ((0, 2), 2), ((-3, 0), 1)])
def test_probe_stops_at_the_deepest_block(base_and_pool, layers, deepest):
    model, tokenizer, pool = base_and_pool
    calls = []
    hooks = [model.model.layers[i].register_forward_hook(lambda *a, i=i: calls.append(i)) for i in range(4)]
    hooks.append(model.lm_head.register_forward_hook(lambda *a: calls.append("lm_head")))
    try:
        for probe_input in ("residual", "module_input"):
            router = Router(model, pool, RoutingConfig(k=2, probe_layers=layers, probe_input=probe_input,
                                                       calibration_score="raw"))
            ids = torch.tensor([tokenizer("hello")["input_ids"]])
            router.route(ids, torch.ones_like(ids))
            # blocks before the deepest complete; the deepest is entered, never finished
            assert calls == list(range(deepest)), calls
            calls.clear()
    finally:
        for h in hooks:
            h.remove()
    assert all(not block._forward_pre_hooks for block in model.model.layers), "probe hooks must be removed"


def test_ties_are_broken_by_name(base_and_pool):
    model, _, pool = base_and_pool
    router = Router(model, pool, RoutingConfig(k=3, calibration_score="raw"))
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
    router = Router(model, pool, RoutingConfig(k=len(pool), probe_layers=-1, probe_module="q_proj",
                                               calibration_score="raw"))
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


def test_gram_norm_equals_direct_norm_for_every_adapter(base_and_pool):
    """||c B A h|| from the index's A and Gram matrix equals the direct product, at every pair."""
    from actors.index import pair_scores

    _, _, pool = base_and_pool
    adapters = {a.name: a for a in (read_adapter(n, p) for n, p in zip(pool.names, pool.paths))}
    h = torch.randn(5, 64, generator=torch.Generator().manual_seed(0))  # (B, d)
    assert pool.routing_index.factors, "the index holds the probe modules"
    for path, factors in pool.routing_index.factors.items():
        got = pair_scores(h, factors, "norm")  # (B, N)
        for i, name in enumerate(pool.names):
            f = adapters[name].factors.get(path)
            want = torch.zeros(5) if f is None else (f.scale * (h @ f.A.T) @ f.B.T).norm(dim=-1)
            torch.testing.assert_close(got[:, i], want, rtol=1e-5, atol=1e-6)


def test_bfloat16_pool_scores_from_float32_factors(tiny_dir, tmp_path):
    """Two adapters whose B differ by less than bfloat16 resolves: rounded factors would tie (the
    earlier name wins); the float32 factors from the files rank the larger one first."""
    root = tmp_path / "pool"
    tiny_adapter(tiny_dir, root / "a_x", r=4, alpha=8, target_modules=("q_proj",), seed=7)
    tensors = load_file(root / "a_x" / "adapter_model.safetensors")
    exact = {k: v.to(torch.bfloat16).float() for k, v in tensors.items()}  # representable in bfloat16
    save_file(exact, root / "a_x" / "adapter_model.safetensors")
    (root / "b_y").mkdir()
    (root / "b_y" / "adapter_config.json").write_text((root / "a_x" / "adapter_config.json").read_text())
    save_file({k: v * (1 + 2**-10) if "lora_B" in k else v for k, v in exact.items()},
              root / "b_y" / "adapter_model.safetensors")
    paper = dict(probe_layers=-1, probe_module="q_proj", calibration_score="raw", k=1)
    predictor = LoGoPredictor(model=tiny_dir, adapters=root, dtype="bfloat16", device="cpu", max_new_tokens=1, **paper)
    held = predictor.pool.acquire([0, 1])
    (_, B_x), (_, B_y) = (held[i]["model.layers.3.self_attn.q_proj"] for i in (0, 1))
    assert B_x.dtype == torch.bfloat16
    assert torch.equal(B_x, B_y), "in bfloat16 the two adapters are the same"
    for prompt in PROMPTS[:6]:
        (routing,) = predictor.engine.route([predictor.encode(prompt)[0]])
        assert routing.adapters == ("b_y",)


def test_bfloat16_pool_routes_as_float32_reference(tiny_dir, pool_dir):
    """Default routing of a bfloat16 model and pool equals the direct float32 computation from the
    safetensors factors on that model's own hidden states, with the same statistics."""
    predictor = LoGoPredictor(model=tiny_dir, adapters=pool_dir, dtype="bfloat16", device="cpu", k=3,
                              max_new_tokens=1)
    plain = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.bfloat16).eval()
    config = predictor.engine.routing
    assert config.calibration_score == "zscore" and config.probe_layers == "all"
    for prompt in PROMPTS[:8]:
        seq = predictor.encode(prompt)[0]
        (routing,) = predictor.engine.route([seq])
        names, weights = direct_routing(plain, pool_dir, seq, config, predictor.calibration)
        assert list(routing.adapters) == names
        assert routing.weights == pytest.approx(weights, rel=1e-4, abs=1e-6)
