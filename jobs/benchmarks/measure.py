"""Timing and peak memory of benchmark methods, measured round-robin so that noise hits all alike.

Peak memory on the CPU is the process's resident-set high-water mark (VmHWM), reset before each run
by writing 5 to /proc/self/clear_refs (Linux); the figure recorded is how far it rose above the
resident set before the run (activations, KV cache, temporary copies), next to the bytes of weights
the method holds. On CUDA the same two figures come from torch.cuda's allocator statistics.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")


@dataclass
class Method:
    """One way of processing the workload, ready to run."""

    name: str
    """Row label, e.g. "peft-single" or "ours-k20-grouped"."""
    run: Callable[[], object]
    """Processes its prompts once; a dict it returns holds extra figures (probe seconds, unions)."""
    prompts: int
    """Prompts processed per run."""
    new_tokens: int
    """Tokens generated per run (all rows)."""
    weight_bytes: int
    """Bytes of weights the method holds (base model and adapters)."""
    note: str = ""
    """What the row is, for the table."""
    seconds: list[float] = field(default_factory=list)
    work_bytes: list[int] = field(default_factory=list)
    extras: list[dict] = field(default_factory=list)

    def result(self) -> dict:
        median = statistics.median(self.seconds)
        out = {"name": self.name, "note": self.note, "prompts": self.prompts, "new_tokens": self.new_tokens,
               "seconds": self.seconds, "median_seconds": median, "prompts_per_s": self.prompts / median,
               "tokens_per_s": self.new_tokens / median, "weight_mib": self.weight_bytes / 2**20,
               "work_mib": max(self.work_bytes) / 2**20 if self.work_bytes else None}
        out["peak_mib"] = out["weight_mib"] + (out["work_mib"] or 0.0)
        if self.extras:
            out.update({k: _median_or_last([e[k] for e in self.extras]) for k in self.extras[-1]})
        return out


def _median_or_last(values: list):
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return statistics.median(values)
    return values[-1]


def _rss_kib(field_name: str) -> int | None:
    try:
        for line in STATUS.read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakMemory:
    """Extra memory a block of code needs at its peak, in bytes (None where it cannot be measured)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.extra: int | None = None

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._before = torch.cuda.memory_allocated(self.device)
        else:
            try:
                CLEAR_REFS.write_text("5")  # VmHWM := current RSS
                self._before = _rss_kib("VmRSS")
            except OSError:
                self._before = None
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.extra = torch.cuda.max_memory_allocated(self.device) - self._before
        elif self._before is not None:
            peak = _rss_kib("VmHWM")
            self.extra = None if peak is None else max(0, peak - self._before) * 1024


def clock(device: torch.device) -> Callable[[], float]:
    """The timer: process CPU time for a single-threaded CPU run (time that other jobs on a shared
    machine take from us is not counted), wall time otherwise."""
    if device.type == "cpu" and torch.get_num_threads() == 1:
        return time.process_time
    return time.perf_counter


def run_round_robin(methods: list[Method], repeats: int, device: torch.device,
                    log: Callable[[str], None] = print, warmup: bool = False) -> None:
    """`repeats` rounds in which every method runs once (after an untimed round with `warmup`)."""
    now = clock(device)
    for rnd in range(repeats + int(warmup)):
        for m in methods:
            with PeakMemory(device) as mem:
                t0, w0 = now(), time.perf_counter()
                extra = m.run()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                seconds, wall = now() - t0, time.perf_counter() - w0
            log(f"    {'warm-up' if warmup and rnd == 0 else f'round {rnd + 1 - int(warmup)}'} {m.name}: "
                f"{seconds:.2f} s ({wall:.2f} s wall)")
            if warmup and rnd == 0:
                continue
            m.seconds.append(seconds)
            if mem.extra is not None:
                m.work_bytes.append(mem.extra)
            m.extras.append(extra if isinstance(extra, dict) else {})
