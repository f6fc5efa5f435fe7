"""The slot mixture equals the reference loops: bare (every dtype and path), and through the engine's layers."""

from __future__ import annotations

import random

import pytest
import torch

from actors import AdapterPool, GenerationConfig, LoGoEngine, RoutingConfig, read_adapter
from actors.base import load_base
from actors.mixture import SlotMix, mixture_add_, mixture_reference
from actors.router import Routing
from tests.actors.conftest import POOL


def random_case(seed: int, rows: int, T: int, n: int = 6, slots: int = 9):
    """Adapters of mixed ranks in shuffled slots (zero-padded to the largest rank), random selections."""
    g = torch.Generator().manual_seed(seed)
    d_in, d_out = 24, 40
    ranks = [int(torch.randint(1, 6, (1,), generator=g)) for _ in range(n)]
    factors = [(torch.randn(r, d_in, generator=g), torch.randn(d_out, r, generator=g), float(r) / 3) for r in ranks]
    factors[2] = None  # an adapter that does not adapt this module
    where = torch.randperm(slots, generator=g)[:n].tolist()  # adapter -> slot
    A, B = torch.zeros(slots, 8, d_in), torch.zeros(slots, 8, d_out)  # rank 8: rows of 16 bytes in any dtype
    for i, f in enumerate(factors):
        if f is not None:
            A[where[i], : ranks[i]], B[where[i], : ranks[i]] = f[0], (f[1] * f[2]).T  # B: cB transposed
    rng = random.Random(seed)
    selections = [rng.sample(range(n), rng.randint(1, n)) for _ in range(rows)]
    selections[0] = selections[0][:1]
    weights = torch.zeros(rows, n)
    for b, s in enumerate(selections):
        weights[b, s] = torch.rand(len(s), generator=g) + 0.05
    x = torch.randn(rows, T, d_in, generator=g)
    pairs = ([[where[i] for i in s] for s in selections], [[float(weights[b, i]) for i in s] for b, s in enumerate(selections)])
    return x, factors, weights, A, B, pairs, slots


@pytest.mark.parametrize("seed,T", [(0, 1), (1, 2), (2, 3), (3, 8), (4, 9), (5, 17)])  # rank 8: pairs to T = 8
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_slot_mixture_equals_reference_random(seed, T, dtype):
    x, factors, weights, A, B, (slots, w), n_slots = random_case(seed, rows=1 + seed * 3, T=T)
    mix = SlotMix(slots, w, n_slots, torch.device("cpu"), dtype)
    assert mix.grouped == (dtype != torch.float16)  # float16 takes the loop over slots on the CPU
    y = torch.zeros(x.shape[0], x.shape[1], B.shape[2], dtype=dtype)
    mixture_add_(y, x.to(dtype), A.to(dtype).transpose(1, 2), B.to(dtype), mix)
    expected = mixture_reference(x, factors, weights)
    if dtype == torch.float32:
        torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    else:  # to the dtype's precision: the reference on the same rounded inputs, relative to its scale
        rounded = [None if f is None else (f[0].to(dtype).float(), (f[1] * f[2]).to(dtype).float(), 1.0)
                   for f in factors]
        close = mixture_reference(x.to(dtype).float(), rounded, weights.to(dtype).float())
        scale = close.abs().max()
        eps = torch.finfo(dtype).eps
        assert (y.float() - close).abs().max() <= 8 * eps * scale


def test_grouped_and_loop_paths_agree():
    x, _, _, A, B, (slots, w), n_slots = random_case(7, rows=11, T=3)
    out = []
    for grouped in (True, False):
        mix = SlotMix(slots, w, n_slots, torch.device("cpu"), torch.float32)
        mix.grouped = grouped
        y = torch.zeros(x.shape[0], x.shape[1], B.shape[2])
        mixture_add_(y, x, A.transpose(1, 2), B, mix)
        out.append(y)
    torch.testing.assert_close(out[0], out[1], rtol=1e-6, atol=1e-6)


@pytest.fixture(scope="module")
def engine(tiny_dir, pool_dir):
    model, tokenizer = load_base(tiny_dir, torch.float32, torch.device("cpu"))
    pool = AdapterPool.load(pool_dir, model)
    return LoGoEngine(model, tokenizer, pool, RoutingConfig(k=3, calibration_score="raw"), GenerationConfig(max_new_tokens=4))


@pytest.mark.parametrize("seed,T", [(1, 1), (2, 5), (3, 12)])  # slots of rank 8: pairs, then rows
@pytest.mark.parametrize("module", ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj",
                                    "model.layers.3.mlp.down_proj"])
def test_engine_layer_equals_reference(engine, pool_dir, module, seed, T):
    rng = random.Random(seed)
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
    x = torch.randn(rows, T, layer.base_layer.in_features)
    with torch.inference_mode():
        with engine.mixing(routings):
            mixed = layer(x)
        base = layer(x)
    expected = mixture_reference(x, factors, weights)
    assert expected.abs().max() > 1e-3
    torch.testing.assert_close(mixed - base, expected, rtol=1e-5, atol=1e-5)
