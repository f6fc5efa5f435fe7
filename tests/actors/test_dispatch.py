"""What the engine adds to a decode step, counted in aten ops (what a GPU pays in kernel launches):
a fixed number per adapted module whatever the rows select, a small fixed share, no host sync."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import GenerationConfig as HFGenerationConfig

from actors import AdapterPool, GenerationConfig, LoGoEngine, RoutingConfig
from actors.base import load_base
from actors.router import Routing
from tests.actors.conftest import PROMPTS
from tests.tiny import tiny_model_dir, tiny_pool

SYNCS = {"_local_scalar_dense", "is_nonzero", "nonzero", "item"}  # ops that wait for the device
N_ADAPTERS, ROWS = 64, 16


class OpCount(TorchDispatchMode):
    """Counts aten ops (by name) and the bytes of their outputs."""

    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()
        self.out_bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops[func.overloadpacket.__name__] += 1
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.out_bytes += t.nbytes
        return out

    @property
    def total(self) -> int:
        return sum(self.ops.values())

    @property
    def syncs(self) -> int:
        return sum(self.ops[name] for name in SYNCS)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    model_dir = tiny_model_dir(tmp_path_factory.mktemp("dispatch") / "llama3", layers=3)
    pool_dir = tiny_pool(model_dir, tmp_path_factory.mktemp("dispatch-pool"), N_ADAPTERS, seed=5)
    model, tokenizer = load_base(model_dir, torch.float32, torch.device("cpu"))
    pool = AdapterPool.load(pool_dir, model)
    return LoGoEngine(model, tokenizer, pool, RoutingConfig(k=20, calibration_score="raw"),
                      GenerationConfig(max_new_tokens=4))


def fixed(engine, new_tokens: int) -> HFGenerationConfig:
    tok = engine.tokenizer
    return HFGenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                              pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)


def workload(engine, name: str, rows: int = ROWS) -> list[Routing]:
    names, rng = engine.pool.names, random.Random(name)
    if name == "one adapter":
        selections = [(3,)] * rows
    else:
        k, kind = int(name.split()[0][2:]), name.split()[1]
        shared = [tuple(rng.sample(range(N_ADAPTERS), k)) for _ in range(max(1, rows // 4))]
        selections = [shared[b % len(shared)] if kind == "clustered" else tuple(rng.sample(range(N_ADAPTERS), k))
                      for b in range(rows)]
    out = []
    for s in selections:
        w = [rng.random() + 0.1 for _ in s]
        out.append(Routing(indices=s, adapters=tuple(names[i] for i in s), weights=tuple(v / sum(w) for v in w)))
    return out


def seqs(engine, rows: int = ROWS) -> list[list[int]]:
    return [engine.tokenizer(PROMPTS[b % len(PROMPTS)][:24])["input_ids"] for b in range(rows)]


def step_count(run) -> OpCount:
    """Ops of one decode step: a run of 7 new tokens minus a run of 3, over the 4 steps between."""
    counts = []
    for n in (3, 7):
        with OpCount() as c:
            run(n)
        counts.append(c)
    step = OpCount.__new__(OpCount)
    step.ops = Counter({k: (counts[1].ops[k] - counts[0].ops[k]) / 4 for k in counts[1].ops})
    return step


def base_step(engine) -> OpCount:
    ids, mask = engine.pad(seqs(engine))

    def run(n):
        with torch.inference_mode():
            engine.model.generate(input_ids=ids, attention_mask=mask, generation_config=fixed(engine, n))
    return step_count(run)


def engine_step(engine, routings) -> OpCount:
    def run(n):
        engine.hf_config = fixed(engine, n)
        engine.generate(seqs(engine), routings)
    return step_count(run)


def layer_ops(engine, routings) -> int:
    """Ops one adapted layer adds to a pass of one token per row."""
    layer = engine.model.get_submodule(engine.pool.modules[0])
    x = torch.randn(len(routings), 1, layer.base_layer.in_features, device=engine.device, dtype=engine.pool.dtype)
    with torch.inference_mode(), engine.mixing(routings):
        with OpCount() as mixed:
            layer(x)
    with torch.inference_mode(), OpCount() as plain:
        layer.base_layer(x)
    return mixed.total - plain.total


WORKLOADS = ["one adapter", "k=1 scattered", "k=4 clustered", "k=4 scattered", "k=20 clustered", "k=20 scattered"]


def test_a_decode_step_costs_a_fixed_number_of_ops_per_adapted_layer_and_no_sync(engine):
    base = base_step(engine)
    layers = len(engine.pool.modules)
    assert layers == 12  # q, k, v, o of 3 blocks
    seen = {}
    for name in WORKLOADS:
        routings = workload(engine, name)
        per_layer = layer_ops(engine, routings)
        step = engine_step(engine, routings)
        added = step.total - base.total
        fixed = added - per_layer * layers
        seen[name] = (per_layer, added, step.syncs)
        assert per_layer <= 10, f"{name}: {per_layer} ops per adapted layer"
        assert 0 <= fixed <= 0.1 * base.total, f"{name}: {fixed} fixed ops against the base's {base.total}"
        assert step.syncs == base.syncs, f"{name}: {step.syncs} host syncs per step, the base has {base.syncs}"
    assert len(set(seen.values())) == 1, f"the count depends on the selections: {seen}"
    print(f"\nbase step {base.total:.0f} ops, {base.syncs:.0f} syncs; engine adds {seen[WORKLOADS[0]][1]:.0f} "
          f"= {seen[WORKLOADS[0]][0]} x {layers} layers + {seen[WORKLOADS[0]][1] - seen[WORKLOADS[0]][0] * layers:.0f}")


def test_a_generate_call_sends_indices_and_weights_only(engine):
    """64 rows at k = 20: what a call makes outside the forward passes is its pairs' indices,
    weights and group ends (the factors stay where they are, in their slots)."""
    routings = workload(engine, "k=20 scattered", rows=64)
    width = max(len(s) for s in seqs(engine, 64))
    with torch.inference_mode(), OpCount() as c:
        with engine.mixing(routings, widths=(1, width)) as mix:
            held = mix.nbytes
    assert held < 2**20 and c.out_bytes < 2**20
    union = {i for r in routings for i in r.indices}
    copied = sum(engine.pool.sizes()[i] for i in union)  # what concatenating the union's factors copies
    assert held < copied / 10
    print(f"\n64 rows, k=20: {held} bytes of indices and weights per call ({c.out_bytes} made by ops); "
          f"the union's factors: {copied} bytes")
