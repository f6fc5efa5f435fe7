"""Bounded residency: outputs equal the all-resident pool's, LRU accounting, one adapter read at a time."""

from __future__ import annotations

import weakref

import pytest
import torch

import actors.budget
import actors.pool
import actors.predictor
from actors import AdapterPool, LoGoPredictor
from actors.base import load_base
from actors.residency import Residency, ResidencyBound, parse_max_resident, split_by_bound
from tests.actors.conftest import PROMPTS
from tests.tiny import tiny_pool

N_ADAPTERS = 64
ROWS = [f"{p} #{i}" for i in range(2) for p in PROMPTS]  # 32 prompts
OPTIONS = dict(k=3, max_new_tokens=4, device="cpu", calibration_prompts=PROMPTS[:8])


@pytest.fixture(scope="module")
def big_pool(tiny_dir, tmp_path_factory):
    return tiny_pool(tiny_dir, tmp_path_factory.mktemp("big-pool"), N_ADAPTERS, seed=7)


def _run(predictor, rows=ROWS):
    import numpy as np

    out = predictor({"prompt": np.array(rows, dtype=object)})
    return [(o, tuple(a), tuple(w)) for o, a, w in zip(out["output"], out["adapters"], out["weights"])]


def test_bounded_residency_gives_the_all_resident_outputs(tiny_dir, big_pool):
    everything = LoGoPredictor(tiny_dir, big_pool, **OPTIONS)
    expected = _run(everything)
    assert all(o for o, _, _ in expected)
    assert everything.pool.residency.counts.loads == 0  # all resident from the start: nothing read again
    used = {a for _, adapters, _ in expected for a in adapters}
    assert len(used) > 8  # the bound below is really exceeded

    bounded = LoGoPredictor(tiny_dir, big_pool, max_resident=8, **OPTIONS)
    assert _run(bounded) == expected  # row for row: text, adapters and weights
    counts = bounded.pool.residency.counts
    assert counts.peak_adapters <= 8 and counts.evictions > 0 and counts.loads >= len(used)
    assert bounded.stats.loads == counts.loads and bounded.stats.evictions == counts.evictions
    assert bounded.pool.nbytes <= 8 * max(bounded.pool.sizes())
    assert bounded.pool.full_nbytes == everything.pool.full_nbytes > 4 * bounded.pool.nbytes

    # the same bound in bytes, and input order instead of selection order: the same outputs again
    size = f"{8 * max(bounded.pool.sizes()) / 1024:.3f}KiB"
    by_bytes = LoGoPredictor(tiny_dir, big_pool, max_resident=size, ordering="input", **OPTIONS)
    assert _run(by_bytes) == expected
    assert by_bytes.pool.residency.counts.peak_bytes <= parse_max_resident(size).nbytes


def test_selection_ordering_shrinks_the_union_per_batch(tiny_dir, big_pool):
    rows = [p for p in PROMPTS[:4] for _ in range(8)]  # four "tasks", interleaved below
    rows = [rows[(i % 4) * 8 + i // 4] for i in range(len(rows))]
    unions = {}
    for ordering in ("input", "selection"):
        predictor = LoGoPredictor(tiny_dir, big_pool, ordering=ordering, batch_size=8, **OPTIONS)
        _run(predictor, rows)
        unions[ordering] = predictor.stats.decode_union_sum / predictor.stats.generation_batches
    assert unions["selection"] < unions["input"]


def test_a_bound_below_k_is_refused(tiny_dir, big_pool):
    with pytest.raises(ValueError, match=r"max_resident=2 adapters cannot hold one prompt's k=3"):
        LoGoPredictor(tiny_dir, big_pool, max_resident=2, **OPTIONS)
    with pytest.raises(ValueError, match="max_resident="):
        LoGoPredictor(tiny_dir, big_pool, max_resident="1KiB", **OPTIONS)
    with pytest.raises(ValueError, match="not a number of adapters nor a size"):
        LoGoPredictor(tiny_dir, big_pool, max_resident="lots", **OPTIONS)


def test_adapters_are_read_one_at_a_time(tiny_dir, big_pool, monkeypatch):
    model = load_base(tiny_dir, torch.float32, torch.device("cpu"))[0]
    alive: list[weakref.ref] = []
    most = []
    read = actors.pool.read_adapter

    def counting(*args, **kwargs):  # adapters hold no cycles: dropped ones are freed at once
        most.append(sum(r() is not None for r in alive))
        adapter = read(*args, **kwargs)
        alive.append(weakref.ref(adapter))
        return adapter

    monkeypatch.setattr(actors.pool, "read_adapter", counting)
    pool = AdapterPool.load(big_pool, model, max_resident=4)
    assert len(most) == N_ADAPTERS and max(most) <= 1  # never more than the one being indexed
    assert pool.nbytes == 0 and pool.routing_index.nbytes > 0


class _CountingOpen:
    """`safe_open` that counts the bytes of every tensor taken from a file, by file."""

    def __init__(self, real):
        self.real, self.read = real, {}

    def __call__(self, filename, *args, **kwargs):
        counter = self

        class Handle:
            def __enter__(self):
                self.f = counter.real(filename, *args, **kwargs).__enter__()
                return self

            def __exit__(self, *exc):
                return self.f.__exit__(*exc)

            def get_tensor(self, key):
                t = self.f.get_tensor(key)
                counter.read[filename] = counter.read.get(filename, 0) + t.nbytes
                return t

            def __getattr__(self, attr):
                return getattr(self.f, attr)

        return Handle()


def _tensor_bytes(root, names, only=None):
    from safetensors import safe_open

    total = 0
    for name in names:
        with safe_open(str(root / name / "adapter_model.safetensors"), "pt") as f:
            for key in f.keys():
                module = key.split(".lora_")[0]
                if only is None or module.rsplit(".", 1)[-1] in only:
                    total += f.get_tensor(key).nbytes
    return total


def test_a_bounded_pool_reads_only_the_index_tensors_at_start_up(tiny_dir, big_pool, monkeypatch):
    import actors.adapters

    model = load_base(tiny_dir, torch.float32, torch.device("cpu"))[0]
    full = AdapterPool.load(big_pool, model)  # every adapter resident: every tensor read
    counting = _CountingOpen(actors.adapters.safe_open)
    monkeypatch.setattr(actors.adapters, "safe_open", counting)
    pool = AdapterPool.load(big_pool, model, max_resident=4)
    names = sorted(p.name for p in big_pool.iterdir())
    index_bytes, all_bytes = _tensor_bytes(big_pool, names, actors.pool.INDEX_MODULES), _tensor_bytes(big_pool, names)
    assert 0 < index_bytes < all_bytes
    assert sum(counting.read.values()) == index_bytes  # start-up: the index's tensors, nothing else
    assert len(counting.read) == N_ADAPTERS
    # the same pool as a full read: entries (ranks, sizes), dims, slots and the index itself
    assert pool.entries == full.entries and pool.dims == full.dims and pool.slot_ranks == full.slot_ranks
    for path, f in full.routing_index.factors.items():
        g = pool.routing_index.get(path)
        assert torch.equal(f.A, g.A) and torch.equal(f.G, g.G) and torch.equal(f.present, g.present)
    counting.read.clear()
    got = pool.acquire([3, 10])  # becoming resident reads the full factors, of those two only
    assert sum(counting.read.values()) == _tensor_bytes(big_pool, [names[3], names[10]])
    want = full.acquire([3, 10])
    for i in (3, 10):
        assert got[i].keys() == want[i].keys()
        assert all(torch.equal(got[i][m][0], want[i][m][0]) and torch.equal(got[i][m][1], want[i][m][1])
                   for m in want[i])


def test_an_adapter_changed_on_disk_is_refused_when_loaded_again(tiny_dir, tmp_path):
    root = tiny_pool(tiny_dir, tmp_path / "pool", 6, seed=3)
    model = load_base(tiny_dir, torch.float32, torch.device("cpu"))[0]
    pool = AdapterPool.load(root, model, max_resident=2)
    tiny_pool(tiny_dir, tmp_path / "other", 7, seed=3)
    (root / "p002").rename(tmp_path / "gone")
    (tmp_path / "other" / "p001").rename(root / "p002")  # another rank under the same name
    with pytest.raises(ValueError, match="'p002'.*changed since the pool was read"):
        pool.acquire([2])


def test_residency_is_least_recently_used():
    loaded, held_at_load = [], []

    def load(key, slot):
        loaded.append((key, slot))
        held_at_load.append(len(residency.held))

    residency = Residency(ResidencyBound(adapters=3), 3, load, lambda k: 10)
    assert residency.acquire([1, 2, 3]) == {1: 0, 2: 1, 3: 2}
    residency.acquire([1])  # 1 is now the most recent
    assert residency.acquire([4, 5]) == {4: 1, 5: 2}  # evicts 2 and 3, into their slots
    assert list(residency.held) == [1, 4, 5] and [k for k, _ in loaded] == [1, 2, 3, 4, 5]
    assert max(held_at_load) <= 2  # room is made before a load: never one over the bound
    assert residency.counts.as_dict() == {"loads": 5, "hits": 1, "evictions": 2, "peak_adapters": 3, "peak_bytes": 30}
    residency.acquire([1, 4, 5])  # all resident: no load
    assert residency.counts.loads == 5 and residency.counts.hits == 4


def test_split_by_bound_keeps_each_part_within_the_bound():
    selections = [(0, 1), (2, 3), (0, 1), (1, 2), (4, 5), (0, 5)]
    parts = split_by_bound(selections, [1] * 6, ResidencyBound(adapters=3))
    assert sorted(r for p in parts for r in p) == list(range(6))
    assert all(len({i for r in p for i in selections[r]}) <= 3 for p in parts)
    assert any(set(p) >= {0, 2} for p in parts)  # equal selections stay together
    assert split_by_bound(selections, [1] * 6, ResidencyBound()) == [list(range(6))]
    assert split_by_bound(selections, [5] * 6, ResidencyBound(nbytes=10))[0] == [0, 2]


@pytest.mark.parametrize("value, bound", [(8, ResidencyBound(adapters=8)), ("8", ResidencyBound(adapters=8)),
                                          ("1.5GiB", ResidencyBound(nbytes=3 * 2**29)),
                                          ("20GB", ResidencyBound(nbytes=20 * 10**9)), (None, ResidencyBound()),
                                          ("auto", ResidencyBound(auto=True))])
def test_max_resident_forms(value, bound):
    assert parse_max_resident(value) == bound


@pytest.mark.parametrize("value", [0, -1, True, "0", "12 parsecs", 1.5])
def test_bad_max_resident_is_refused(value):
    with pytest.raises(ValueError, match="max_resident"):
        parse_max_resident(value)


def test_auto_is_the_whole_pool_on_the_cpu_and_the_free_memory_less_headroom_on_a_gpu(tiny_dir, big_pool,
                                                                                       monkeypatch):
    model = load_base(tiny_dir, torch.float32, torch.device("cpu"))[0]
    pool = AdapterPool.load(big_pool, model, max_resident="auto")
    assert pool.bound.unbounded and pool.slots == N_ADAPTERS and pool.nbytes == pool.full_nbytes
    assert pool.budget_lines() == []  # nothing to budget on the CPU
    assert LoGoPredictor.__init__.__kwdefaults__["max_resident"] == "auto"
    assert actors.budget.MEMORY_HEADROOM == 0.1

    gib = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (50 * gib, 140 * gib))
    gpu = torch.device("cuda:0")
    assert actors.budget.device_budget(gpu, 0.25).nbytes == 15 * gib
    assert actors.budget.device_budget(gpu, 0.25, reserved=5 * gib).nbytes == 10 * gib  # the KV cache kept free
    assert actors.budget.device_budget(gpu, 0.5).nbytes == 0
    assert actors.budget.device_budget(torch.device("cpu"), 0.25) is None

    slot = pool.slot_nbytes
    seen = []

    def budget(device, headroom, reserved=0):
        seen.append((device, headroom, reserved))
        return actors.budget.DeviceBudget(device, int(10.5 * slot) + reserved + int(headroom * 100 * slot),
                                        100 * slot, headroom, reserved)

    monkeypatch.setattr(actors.pool, "device_budget", budget)
    cpu = torch.device("cpu")
    budgeted = AdapterPool.load(big_pool, model, max_resident="auto", memory_headroom=0.2, kv_cache={cpu: 3 * slot})
    assert (cpu, 0.2, 3 * slot) in seen  # the headroom and the KV cache both come off the free memory
    assert budgeted.slots == 10 and budgeted.storage_nbytes <= 10.5 * slot
    assert budgeted.nbytes == 0 and budgeted.bound.describe() == "auto"
    lines = budgeted.budget_lines()
    assert "headroom 20%" in lines[0] and "KV cache" in lines[0] and lines[-1].startswith("= 10 adapter slots")
    with pytest.raises(ValueError, match="memory_headroom=1.5"):
        AdapterPool.load(big_pool, model, max_resident="auto", memory_headroom=1.5)


def test_slots_are_what_every_device_holds_its_share_of():
    """With a device map each device holds the slots of its own modules: the slot count is the
    smallest that every device's budget allows."""
    a, b = torch.device("cuda:0"), torch.device("cuda:1")
    budgets = {a: actors.budget.DeviceBudget(a, 1000, 1000, 0.0, 0), b: actors.budget.DeviceBudget(b, 900, 1000, 0.1, 300)}
    assert budgets[b].nbytes == 500
    assert actors.budget.slots_within(budgets, {a: 100, b: 20}) == 10  # device a limits
    assert actors.budget.slots_within(budgets, {a: 10, b: 100}) == 5  # device b limits
    assert actors.budget.slots_within(budgets, {a: 10, b: 0}) == 100  # b holds none of the adapted modules


def test_the_kv_cache_reserved_is_a_full_batch_of_the_longest_prompt(tiny_dir, big_pool, monkeypatch):
    model = load_base(tiny_dir, torch.float32, torch.device("cpu"))[0]
    c = model.config
    per_token = 2 * c.num_key_value_heads * (c.hidden_size // c.num_attention_heads) * 4
    assert actors.budget.kv_cache_nbytes(c, 16, 100, 4) == 16 * 100 * per_token
    reserved = {}
    real = actors.pool.AdapterPool.__init__

    def record(self, *args, kv_cache=None, **kwargs):
        reserved.update(kv_cache)
        real(self, *args, kv_cache=kv_cache, **kwargs)

    monkeypatch.setattr(actors.pool.AdapterPool, "__init__", record)
    LoGoPredictor(tiny_dir, big_pool, batch_size=5, max_prompt_tokens=40, **OPTIONS)
    blocks = c.num_hidden_layers
    assert reserved == {torch.device("cpu"): blocks * actors.budget.kv_cache_nbytes(c, 5, 40 + 4, 4)}
    monkeypatch.setattr(actors.predictor, "KV_PROMPT_TOKENS", 30)  # no max_prompt_tokens: the assumed longest
    LoGoPredictor(tiny_dir, big_pool, batch_size=5, **OPTIONS)
    assert reserved == {torch.device("cpu"): blocks * actors.budget.kv_cache_nbytes(c, 5, 30 + 4, 4)}


def test_an_auto_budget_below_k_is_refused(tiny_dir, big_pool, monkeypatch):
    monkeypatch.setattr(actors.pool, "device_budget",
                        lambda device, headroom, reserved=0: actors.budget.DeviceBudget(device, 1000, 1000, 0, 0))
    with pytest.raises(ValueError, match=r"max_resident=auto holds 0 adapter slots.*KV cache.*batch_size"):
        LoGoPredictor(tiny_dir, big_pool, max_resident="auto", **OPTIONS)


def test_the_routing_index_is_filled_in_place(tiny_dir, big_pool, monkeypatch):
    from actors.adapters import read_adapter
    from actors.index import RoutingIndex

    model = load_base(tiny_dir, torch.float32, torch.device("cpu"))[0]
    names = sorted(p.name for p in big_pool.iterdir())
    stacked = AdapterPool((read_adapter(n, big_pool / n) for n in names), model, torch.float32, torch.device("cpu"),
                          index_with_B=True).routing_index  # an iterator, no sizes: pieces stacked at the end

    def no_stack(self, path):
        raise AssertionError("the index was stacked from pieces")

    monkeypatch.setattr(RoutingIndex, "_stack", no_stack)
    for bound in (None, 4):
        index = AdapterPool.load(big_pool, model, index_with_B=True, max_resident=bound).routing_index
        assert index.factors.keys() == stacked.factors.keys() and index._held == []
        for path, f in stacked.factors.items():
            g = index.get(path)
            assert all(torch.equal(getattr(f, k), getattr(g, k)) for k in ("A", "G", "B", "present"))


def test_the_routing_index_is_built_once_per_pool_version_and_shared(tiny_dir, tmp_path, monkeypatch):
    import actors.adapters
    from actors.fingerprint import ChangedFileError, fingerprint, tree_files

    root = tiny_pool(tiny_dir, tmp_path / "pool", 6, seed=5)
    model = load_base(tiny_dir, torch.float32, torch.device("cpu"))[0]
    pins = {key: fingerprint(path) for key, path in tree_files(root).items()}
    cache = tmp_path / "cache"
    counting = _CountingOpen(actors.adapters.safe_open)
    monkeypatch.setattr(actors.adapters, "safe_open", counting)
    first = AdapterPool.load(root, model, max_resident=2, pins=pins, index_cache=cache)
    files = sorted((cache / "routing-index").glob("*.safetensors"))
    assert len(files) == 1 and sum(counting.read.values()) > 0
    counting.read.clear()
    second = AdapterPool.load(root, model, max_resident=2, pins=pins, index_cache=cache)
    assert sum(counting.read.values()) == 0  # no adapter tensor read: the index comes from the file
    assert second.entries == first.entries and second.dims == first.dims
    for path, f in first.routing_index.factors.items():
        g = second.routing_index.get(path)
        assert torch.equal(f.A, g.A) and torch.equal(f.G, g.G) and torch.equal(f.present, g.present)
    got, want = second.acquire([1, 4]), first.acquire([1, 4])  # full factors read when resident
    assert all(torch.equal(got[i][m][0], want[i][m][0]) for i in want for m in want[i])
    # an adapter replaced: under the old pins (the same index file) every adapter's pins are still checked
    tiny_pool(tiny_dir, tmp_path / "other", 6, seed=9)
    (root / "p003").rename(tmp_path / "old")
    (tmp_path / "other" / "p003").rename(root / "p003")
    with pytest.raises(ChangedFileError, match="'p003' file .* changed since the run started"):
        AdapterPool.load(root, model, max_resident=2, pins=pins, index_cache=cache)
    # the new pool version: a new file, built from its tensors
    pins = {key: fingerprint(path) for key, path in tree_files(root).items()}
    counting.read.clear()
    third = AdapterPool.load(root, model, max_resident=2, pins=pins, index_cache=cache)
    assert len(list((cache / "routing-index").glob("*.safetensors"))) == 2 and sum(counting.read.values()) > 0
    fresh = AdapterPool.load(root, model, max_resident=2)
    for path, f in fresh.routing_index.factors.items():
        assert torch.equal(f.A, third.routing_index.get(path).A)
