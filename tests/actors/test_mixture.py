"""The fast mixture equals the reference loops: bare, and through the engine's plan and layers."""

from __future__ import annotations

import random

import pytest
import torch

from actors import AdapterPool, GenerationConfig, LoGoEngine, RoutingConfig, read_adapter
from actors.base import load_base
from actors.grouping import Group, group_rows
from actors.mixture import mixture_fast, mixture_reference
from actors.router import Routing
from tests.actors.conftest import POOL


@pytest.mark.parametrize("seed", range(5))
def test_fast_equals_reference_random(seed):
    g = torch.Generator().manual_seed(seed)
    rows, T, d_in, d_out, n = 1 + seed * 3, 1 + seed, 24, 40, 6
    ranks = [int(torch.randint(1, 6, (1,), generator=g)) for _ in range(n)]
    factors = [(torch.randn(r, d_in, generator=g), torch.randn(d_out, r, generator=g), float(r) / 3)
               for r in ranks]
    factors[2] = None  # an adapter that does not adapt this module
    weights = torch.rand(rows, n, generator=g) * (torch.rand(rows, n, generator=g) > 0.4)
    x = torch.randn(rows, T, d_in, generator=g)
    union = [i for i in range(n) if factors[i] is not None and weights[:, i].any()]
    A_U = torch.cat([factors[i][0] for i in union])  # (C, d_in)
    B_U = torch.cat([factors[i][1] * factors[i][2] for i in union], dim=1)  # (d_out, C)
    W = torch.cat([weights[:, i : i + 1].expand(rows, ranks[i]) for i in union], dim=1)  # (rows, C)
    torch.testing.assert_close(mixture_fast(x, A_U, B_U, W), mixture_reference(x, factors, weights),
                               rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def engine(tiny_dir, pool_dir):
    model, tokenizer = load_base(tiny_dir, torch.float32, torch.device("cpu"))
    pool = AdapterPool.load(pool_dir, model)
    return LoGoEngine(model, tokenizer, pool, RoutingConfig(k=3, calibration_score="raw"), GenerationConfig(max_new_tokens=4))


@pytest.mark.parametrize("max_groups", [1, 2, 4, 16])
@pytest.mark.parametrize("module", ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj",
                                    "model.layers.3.mlp.down_proj"])
def test_engine_layer_equals_reference(engine, pool_dir, module, max_groups):
    rng = random.Random(max_groups)
    adapters = {name: read_adapter(name, pool_dir / name) for name in POOL}
    names = engine.pool.names
    rows = 12
    routings = []
    for _ in range(rows):
        idx = rng.sample(range(len(names)), rng.randint(1, len(names)))
        w = [rng.random() + 0.01 for _ in idx]
        routings.append(Routing(indices=tuple(idx), adapters=tuple(names[i] for i in idx),
                                weights=tuple(v / sum(w) for v in w)))
    weights = torch.zeros(rows, len(names))
    for b, r in enumerate(routings):
        weights[b, list(r.indices)] = torch.tensor(r.weights)
    factors = [(a.factors[module].A, a.factors[module].B, a.factors[module].scale)
               if module in a.factors else None for a in (adapters[n] for n in names)]
    layer = engine.model.get_submodule(module)
    x = torch.randn(rows, 5, layer.base_layer.in_features)
    groups = group_rows([r.indices for r in routings], max_groups=max_groups, overhead=0.0)
    assert sorted(r for g in groups for r in g.rows) == list(range(rows))
    with torch.inference_mode():
        with engine.mixing(routings, groups):
            mixed = layer(x)
        base = layer(x)
    expected = mixture_reference(x, factors, weights)
    assert expected.abs().max() > 1e-3
    torch.testing.assert_close(mixed - base, expected, rtol=1e-4, atol=1e-4)


def test_plan_uses_slices_for_contiguous_rows(engine):
    names = engine.pool.names
    routings = [Routing(indices=(i,), adapters=(names[i],), weights=(1.0,)) for i in (0, 0, 0, 1)]
    plan = engine.plan(routings, [Group(rows=(0, 1), union=(0,)), Group(rows=(2, 3), union=(0, 1))])
    terms = plan["model.layers.0.self_attn.q_proj"]
    assert terms[0].rows == slice(0, 2) and terms[1].rows == slice(2, 4)
    plan = engine.plan(routings, [Group(rows=(0, 2), union=(0,)), Group(rows=(1, 3), union=(0, 1))])
    assert torch.equal(plan["model.layers.0.self_attn.q_proj"][0].rows, torch.tensor([0, 2]))
