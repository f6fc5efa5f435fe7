"""Start-up of a pool of 1,000 adapters: what each actor reads and holds before its first routed row.

    logo-batch bench --startup [--adapters 1000] [--out runs/bench-startup]

On the 8b-ratio shape (rank-16 adapters on the attention projections of two 1024-wide blocks;
random weights), N synthetic PEFT-format adapters are written to disk once; then 1 and 2 "actors"
(separate processes on this node, started together) each build the pool as a job's actor does
(`AdapterPool.load` with max_resident 8, then a `Router` routes one prompt), twice:

- before: the full read (every adapter's every tensor read in float32, the routing index kept as
  per-adapter pieces and stacked at the end): the pool's code path before the index was read alone;
- after: only the routing index's tensors read (q_proj and v_proj), the index filled in place;
- shared: the index memory-mapped from the node's cache file, written beforehand by one load (as a
  job's calibration task does): no adapter tensor read (host peak counts the mapped index pages,
  which the actors of a node share through the page cache).

Per actor: bytes of tensors read at start-up (counted at `safe_open(...).get_tensor`), host peak
RSS above the process's RSS with the model loaded, and seconds from the start of the load to the
first routed row; the ratios before / after. The page cache is warm for both (the files were just
written), so seconds measure the reading and stacking work, not the disk.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SLOTS = 8
MODES = ("before", "after", "shared")


def write_pool(root: Path, n: int) -> None:
    """`n` adapters of the 8b-ratio shape under `root`, a0000 ... (one in memory at a time)."""
    from jobs.benchmarks.config import RATIO_8B
    from jobs.benchmarks.models import random_model, synthetic_pool

    model = random_model(RATIO_8B, seed=0)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            synthetic_pool(model, RATIO_8B, 1, seed=1000 + i, root=Path(tmp))
            (Path(tmp) / "a000").rename(root / f"a{i:04d}")


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def actor(pool_dir: str, mode: str, cache: str | None = None) -> dict:
    """One actor's start-up (run in its own process): the figures as a dict."""
    import torch

    import actors.adapters
    import actors.pool
    from actors import AdapterPool, Router, RoutingConfig
    from jobs.benchmarks.config import RATIO_8B
    from jobs.benchmarks.models import random_model

    torch.set_num_threads(1)
    model = random_model(RATIO_8B, seed=0).eval()
    read = {"bytes": 0}
    real_open = actors.adapters.safe_open

    class Counting:
        def __init__(self, *args, **kwargs):
            self.f = real_open(*args, **kwargs)

        def __enter__(self):
            self.h = self.f.__enter__()
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def get_tensor(self, key):
            t = self.h.get_tensor(key)
            read["bytes"] += t.nbytes
            return t

    actors.adapters.safe_open = Counting
    if mode == "before":  # the full read: every tensor, the index stacked from pieces
        real_read = actors.pool.read_adapter
        actors.pool.read_adapter = lambda name, path, model=None, only=None: real_read(name, path, model)
        actors.pool.header_shapes = lambda path: None
    base = _rss()
    start = time.perf_counter()
    pool = AdapterPool.load(pool_dir, model, max_resident=SLOTS, index_cache=cache if mode == "shared" else None)
    loaded = time.perf_counter()
    router = Router(model, pool, RoutingConfig(k=4, calibration_score="raw"))
    ids = torch.randint(4, RATIO_8B.vocab, (1, 24))
    routing = router.route(ids, torch.ones_like(ids))
    first = time.perf_counter()
    assert len(routing[0].adapters) == 4
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"mode": mode, "bytes_read": read["bytes"], "peak_rss_above_model": peak - base,
            "index_bytes": pool.routing_index.nbytes, "adapter_bytes": max(pool.sizes()),
            "load_s": loaded - start, "first_row_s": first - start}


def run(n: int, log, work: Path | None = None) -> dict:
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        pool_dir = Path(tmp) / "pool"
        t = time.perf_counter()
        write_pool(pool_dir, n)
        disk = sum(f.stat().st_size for f in pool_dir.rglob("*.safetensors"))
        log(f"wrote {n} adapters ({disk / 2**20:.0f} MiB) in {time.perf_counter() - t:.0f} s")
        results = []
        cache = Path(tmp) / "cache"
        for actors_n in (1, 2):
            for mode in MODES:
                cmd = [sys.executable, "-m", "jobs.benchmarks.startup", str(pool_dir), mode, str(cache)]
                if mode == "shared" and not cache.exists():  # the calibration task's load writes the file
                    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
                procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for _ in range(actors_n)]
                outs = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
                if any(p.returncode for p in procs):
                    raise RuntimeError(f"an actor failed ({mode}, {actors_n} actors)")
                for o in outs:
                    o["actors"] = actors_n
                results.extend(outs)
                log(f"{actors_n} actor(s) {mode}: {outs}")
        return {"adapters": n, "disk_bytes": disk, "slots": SLOTS, "runs": results}


def table(result: dict) -> str:
    mib = 2**20
    lines = [f"{result['adapters']} adapters of the 8b-ratio shape ({result['disk_bytes'] / mib:.0f} MiB on disk), "
             f"max_resident {result['slots']}; per actor (mean over the actors started together); ratios: "
             "before / this", "",
             "| actors | start-up | tensors read | ratio | host peak | ratio | first routed row | ratio |",
             "|---|---|---|---|---|---|---|---|"]
    for n in (1, 2):
        def mean(mode, key):
            vals = [r[key] for r in result["runs"] if r["actors"] == n and r["mode"] == mode]
            return sum(vals) / len(vals)
        rb, pb, tb = (mean("before", k) for k in ("bytes_read", "peak_rss_above_model", "first_row_s"))
        for mode in MODES:
            r, p, t = (mean(mode, k) for k in ("bytes_read", "peak_rss_above_model", "first_row_s"))
            lines.append(f"| {n} | {mode} | {r / mib:.0f} MiB | {rb / r:.2f}x | {p / mib:.0f} MiB | {pb / max(p, 1):.2f}x"
                         f" | {t:.2f} s | {tb / t:.2f}x |" if r else
                         f"| {n} | {mode} | 0 | - | {p / mib:.0f} MiB | {pb / max(p, 1):.2f}x | {t:.2f} s | {tb / t:.2f}x |")
    after = [r for r in result["runs"] if r["mode"] == "after"][0]
    lines += ["", f"routing index {after['index_bytes'] / mib:.1f} MiB, one adapter's full factors "
              f"{after['adapter_bytes'] / mib:.2f} MiB (float32); after: bytes read = the index's tensors "
              f"(the resident set is read when adapters become resident, not at start-up)"]
    return "\n".join(lines)


if __name__ == "__main__":
    print(json.dumps(actor(*sys.argv[1:4])))
