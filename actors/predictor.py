"""`LoGoPredictor`: the callable class that Ray Data instantiates once per actor (no Ray import).

    predictor = LoGoPredictor(model="path/to/model", adapters="path/to/pool",
                              routing=RoutingConfig(k=3), generation=GenerationConfig(max_new_tokens=16))
    # or the same with keyword shortcuts: LoGoPredictor(..., k=3, max_new_tokens=16)
    out = predictor({"prompt": np.array(["...", "..."], dtype=object)})
    out["output"], out["adapters"], out["weights"], out["error"]

A bad row (null, empty or non-string prompt; an over-long prompt with overlong="error") becomes an
error on that row; the rest of the batch is processed. Bad options, a bad model or a bad adapter
raise ValueError in the constructor, before any row is seen.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

from actors.base import block_devices, context_length, load_base, resolve_device, resolve_dtype
from actors.batching import generation_batches
from actors.calibration import CalibrationStats, compute_stats, reference_prompts
from actors.engine import BatchStats, LoGoEngine
from actors.fingerprint import ChangedFileError, check_names, read_pinned, tree_files
from actors.options import OUTPUT_COLUMNS, GenerationConfig, RoutingConfig, build_options
from actors.pool import MEMORY_HEADROOM, AdapterPool, kv_cache_nbytes
from actors.router import Routing

log = logging.getLogger(__name__)

KV_PROMPT_TOKENS = 4096
"""With `max_resident: auto` and no `max_prompt_tokens`: the prompt length the KV cache reserve assumes."""

FATAL = (torch.cuda.OutOfMemoryError, MemoryError, ChangedFileError)


TRUNCATED = "prompt truncated from the left"
"""How the warning of a row whose prompt was cut to the allowed length begins."""


@dataclass
class PredictorStats:
    """Running totals over the batches one predictor has processed."""

    batches: int = 0
    rows: int = 0
    errors: int = 0
    new_tokens: int = 0
    seconds: float = 0.0
    groups: int = 0
    union_sum: int = 0  # sum of prefill groups' union sizes
    decode_groups: int = 0
    decode_union_sum: int = 0  # sum of decode groups' union sizes
    generation_batches: int = 0
    grouping_seconds: float = 0.0
    generate_seconds: float = 0.0
    calls: int = 0
    loads: int = 0
    hits: int = 0
    evictions: int = 0
    oom_splits: int = 0
    adapter_use: dict[str, int] = field(default_factory=dict)


def _is_fatal(exc: BaseException) -> bool:
    return isinstance(exc, FATAL) or (isinstance(exc, RuntimeError) and "CUDA error" in str(exc))


class LoGoPredictor:
    """Routes each prompt of a batch to its adapter mixture and generates its output."""

    def __init__(
        self,
        model: str | Path,
        adapters: str | Path | Mapping[str, str | Path],
        *,
        routing: RoutingConfig | None = None,
        generation: GenerationConfig | None = None,
        calibration: str | Path | Mapping | CalibrationStats | None = None,
        calibration_prompts: list[str] | str | None = None,
        max_resident: int | str | None = "auto",
        memory_headroom: float = MEMORY_HEADROOM,
        gpus: int = 1,
        batch_size: int = 16,
        dtype: str = "auto",
        device: str = "auto",
        prompt_column: str = "prompt",
        pins: Mapping[str, Mapping[str, str]] | None = None,
        index_cache: str | Path | None = None,
        **shortcuts: Any,
    ):
        """`routing` and `generation` hold the options (actors.options); any of their fields may be
        given as a keyword instead (`k=3`, `max_new_tokens=16`), but not as both with different
        values. `max_resident`: at most this many adapters (an int) or bytes ('20GiB') of full factors
        on the device, or `auto` (the default): what the device has free once the model and the
        routing index are loaded, less `memory_headroom` of its memory and the KV cache of a full
        batch (`batch_size` rows of the longest prompt plus `max_new_tokens`), logged with its
        arithmetic; the whole pool on the CPU; None keeps the whole pool resident. `gpus` > 1 (CUDA):
        the model is spread over that many visible devices (a device map), each module's adapter
        slots beside it. `batch_size`: rows per generate call (the rows of a call are formed by
        `generation.ordering`). `pins`: {"model": ..., "adapters": ...} (either may be left out),
        relative file name -> fingerprint (a job's `_job.json`): the model's and pool's files must be
        exactly these, each checked when it is read (`actors.fingerprint`); `ChangedFileError`
        otherwise. `index_cache`: a folder where the routing index is kept per pool version and
        shared by the processes of a node (`AdapterPool.load`)."""
        routing, generation = build_options(routing, generation, shortcuts,
                                            ("model", "adapters", *LoGoPredictor.__init__.__kwdefaults__))
        calibration_score = routing.calibration_score
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r}: must be an integer >= 1 (rows per generate call)")
        if not isinstance(gpus, int) or isinstance(gpus, bool) or gpus < 1:
            raise ValueError(f"gpus={gpus!r}: must be an integer >= 1 (CUDA devices to spread the model over)")
        if calibration is not None and calibration_prompts is not None:
            raise ValueError("pass either calibration (statistics) or calibration_prompts, not both")
        if calibration_score != "raw" and calibration is None and calibration_prompts is None:
            calibration_prompts = "reference"  # calibrated by default: the shipped set, computed once here
        self.batch_size, self.ordering = batch_size, generation.ordering
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.overlong, self.prompt_column = generation.overlong, prompt_column
        pins = pins or {}
        for what, root in (("model", model), ("adapters", adapters)):
            if what in pins:
                check_names(Path(root), pins[what], what)
        model_files = tree_files(Path(model)) if "model" in pins else {}
        base, self.tokenizer = read_pinned(model_files, pins.get("model"),
                                           lambda: load_base(model, self.dtype, self.device, gpus, memory_headroom),
                                           "model")
        max_new_tokens = generation.max_new_tokens
        limit = context_length(base) - max_new_tokens
        if limit < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's "
                             f"context of {context_length(base)} tokens")
        self.max_prompt_tokens = min(limit, generation.max_prompt_tokens or limit)
        pool = AdapterPool.load(adapters, base, dtype=self.dtype, device=self.device,
                                index_modules=routing.probe_modules, index_with_B=routing.signal == "entropy",
                                max_resident=max_resident, memory_headroom=memory_headroom,
                                kv_cache=self._kv_cache(base, batch_size, generation), pins=pins.get("adapters"),
                                index_cache=index_cache)
        self.engine = LoGoEngine(base, self.tokenizer, pool, replace(routing, calibration_score="raw"), generation)
        self.calibration = self._calibration(calibration, calibration_prompts)
        if self.calibration is not None or calibration_score != "raw":
            self.engine.set_routing(routing, self.calibration)
        self._call_rows = self._reported = 0
        self.on_rows: Callable[[int], None] | None = None
        """Called with a number of rows each time that many of a call's rows are done (progress)."""
        self.stats = PredictorStats()
        self.last_stats: BatchStats | None = None
        log.info("LoGo predictor ready: %s", pool.describe())
        for line in pool.budget_lines():
            log.info("adapter slot budget: %s", line)

    def _kv_cache(self, base, batch_size: int, generation: GenerationConfig) -> dict:
        """Bytes per device of the KV cache of a full generate call: `batch_size` rows of the longest
        prompt admitted plus `max_new_tokens`, for the blocks each device holds. The longest prompt
        is `max_prompt_tokens` when set, else the model's context up to `KV_PROMPT_TOKENS` (a 128K
        context would reserve a terabyte; a longer prompt still runs, in a call halved on out of memory)."""
        longest = generation.max_prompt_tokens or min(self.max_prompt_tokens, KV_PROMPT_TOKENS)
        per_block = kv_cache_nbytes(base.config, batch_size, min(longest, self.max_prompt_tokens)
                                    + generation.max_new_tokens, torch.tensor([], dtype=self.dtype).element_size())
        out: dict = {}
        for device in block_devices(base):
            out[device] = out.get(device, 0) + per_block
        return out

    def _calibration(self, calibration, prompts) -> CalibrationStats | None:
        """Statistics given (object, dict or JSON file) or computed now from prompts."""
        if isinstance(calibration, CalibrationStats):
            return calibration
        if isinstance(calibration, Mapping):
            return CalibrationStats.from_dict(dict(calibration))
        if calibration is not None:
            return CalibrationStats.load(calibration)
        if prompts is None:
            return None
        source = "given prompts"
        if isinstance(prompts, str):
            if prompts != "reference":
                raise ValueError(f"calibration_prompts={prompts!r}: pass a list of prompts or 'reference'")
            prompts, source = reference_prompts(), "reference"
        seqs = [ids for ids, error, _ in map(self.encode, prompts) if error is None]
        if not seqs:
            raise ValueError("calibration_prompts holds no usable prompt (all null, empty or not strings)")
        return compute_stats(self.engine.router, seqs, source)

    @property
    def pool(self) -> AdapterPool:
        return self.engine.pool

    def encode(self, prompt: Any) -> tuple[list[int] | None, str | None, str | None]:
        """One prompt -> (token ids, error, warning). Never raises for a bad prompt."""
        if prompt is None or (isinstance(prompt, float) and np.isnan(prompt)):
            return None, f"prompt is null; give every row a non-empty string in column {self.prompt_column!r}", None
        if not isinstance(prompt, str):
            return None, (f"prompt is a {type(prompt).__name__}, not a string; store column "
                          f"{self.prompt_column!r} as strings"), None
        if not prompt.strip():
            return None, (f"prompt is empty or blank; give every row a non-empty string in column "
                          f"{self.prompt_column!r}"), None
        ids = self.tokenizer(prompt)["input_ids"]
        limit = self.max_prompt_tokens
        if len(ids) <= limit:
            return ids, None, None
        if self.overlong == "error":
            return None, (f"prompt has {len(ids)} tokens, more than the {limit} allowed (context minus "
                          "max_new_tokens); shorten it or run with overlong='truncate'"), None
        return ids[-limit:], None, f"{TRUNCATED}: {len(ids)} -> {limit} tokens"

    def _done(self, rows: int) -> None:
        """Report `rows` more rows of the current call done (never more than the call has)."""
        rows = min(rows, self._call_rows - self._reported)
        if rows > 0:
            self._reported += rows
            if self.on_rows is not None:
                self.on_rows(rows)

    def process(self, seqs: list[list[int]]) -> tuple[list[Routing | None], list[str], list[int], BatchStats]:
        """Route tokenised prompts (probe passes of `batch_size` rows), then generate them in batches
        of `batch_size` formed by `ordering` (see actors.batching). Stats cover all of them, with
        row positions into `seqs`; a row whose probe ran out of memory alone has routing None and an
        error in the stats."""
        t0 = time.perf_counter()
        stats = BatchStats(rows=len(seqs))
        routings: list[Routing | None] = []
        for start in range(0, len(seqs), self.batch_size):
            chunk = BatchStats()
            routings += self.engine.route(seqs[start:start + self.batch_size], chunk)
            stats.absorb(chunk, list(range(start, min(start + self.batch_size, len(seqs)))))
        stats.probe_seconds = time.perf_counter() - t0
        texts, counts = [""] * len(seqs), [0] * len(seqs)
        routed = [r for r in range(len(seqs)) if routings[r] is not None]  # the others ran out of memory
        batches = generation_batches([len(seqs[r]) for r in routed], [routings[r].indices for r in routed],
                                     self.batch_size, self.ordering)
        batches = [[routed[p] for p in rows] for rows in batches]
        for rows in batches:
            part_texts, part_counts, part = self.engine.generate([seqs[r] for r in rows], [routings[r] for r in rows])
            for r, text, count in zip(rows, part_texts, part_counts):
                texts[r], counts[r] = text, count
            stats.absorb(part, rows)
            self._done(len(rows))
        stats.batches = len(batches)
        return routings, texts, counts, stats

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.prompt_column not in batch:
            raise KeyError(f"the batch has no column {self.prompt_column!r}; columns: {sorted(batch)}")
        t0 = time.perf_counter()
        prompts = batch[self.prompt_column]
        n = len(prompts)
        self._call_rows, self._reported = n, 0
        cols: dict[str, list] = {c: [None] * n for c in OUTPUT_COLUMNS}
        cols["adapters"], cols["weights"] = [[] for _ in range(n)], [[] for _ in range(n)]
        cols["prompt_tokens"], cols["output_tokens"] = [0] * n, [0] * n
        seqs: dict[int, list[int]] = {}
        for row, prompt in enumerate(prompts):
            ids, cols["error"][row], cols["warning"][row] = self.encode(prompt)
            if ids is not None:
                seqs[row] = ids
                cols["prompt_tokens"][row] = len(ids)
        rows = list(seqs)
        results: dict[int, tuple[Routing, str, int]] = {}
        failed: dict[int, str] = {}  # rows whose routing or logits were not finite: no output
        if rows:
            try:
                routings, texts, counts, self.last_stats = self.process([seqs[r] for r in rows])
                results = {r: res for r, res in zip(rows, zip(routings, texts, counts))}
                failed = {rows[i]: why for i, why in self.last_stats.errors.items()}
                self._count_batch(self.last_stats)
            except Exception as exc:  # isolate the failing row(s); device failures stay fatal
                if _is_fatal(exc):
                    raise
                log.warning("batch failed (%s); retrying its %d rows one by one", exc, len(rows))
                for r in rows:
                    try:
                        (routing,), (text,), (count,), stats = self.process([seqs[r]])
                        results[r] = (routing, text, count)
                        if stats.errors:
                            failed[r] = stats.errors[0]
                        self._count_batch(stats)
                    except Exception as row_exc:
                        if _is_fatal(row_exc):
                            raise
                        cols["error"][r] = (f"generation failed for this row ({type(row_exc).__name__}: {row_exc}); "
                                            "check the prompt, or rerun with --overwrite to retry it")
        for r, why in failed.items():
            results.pop(r, None)
            cols["error"][r] = why
        for r, (routing, text, count) in results.items():
            cols["output"][r], cols["output_tokens"][r] = text, count
            cols["adapters"][r], cols["weights"][r] = list(routing.adapters), list(routing.weights)
            notes = []
            if routing.uniform_fallback:
                notes.append("every selected adapter scored 0 or below: uniform weights")
            if not text and cols["warning"][r] and cols["warning"][r].startswith(TRUNCATED):
                notes.append(f"output is empty after the prompt was truncated ({cols['prompt_tokens'][r]} tokens "
                             "kept): its start, where the instruction usually is, was dropped; shorten the prompt")
            for note in notes:
                cols["warning"][r] = f"{cols['warning'][r]}; {note}" if cols["warning"][r] else note
            for name in routing.adapters:
                self.stats.adapter_use[name] = self.stats.adapter_use.get(name, 0) + 1
        self._done(n - self._reported)  # the rows that needed no generation (errors), or were retried
        errors = sum(e is not None for e in cols["error"])
        self.stats.batches += 1
        self.stats.rows += n
        self.stats.errors += errors
        self.stats.seconds += time.perf_counter() - t0
        out = dict(batch)
        for c in OUTPUT_COLUMNS:
            arr = np.empty(n, dtype=object)
            arr[:] = [None] * n
            for i, v in enumerate(cols[c]):
                arr[i] = v
            out[c] = arr.astype(np.int64) if c in ("prompt_tokens", "output_tokens") else arr
        return out

    def batching(self) -> dict[str, float]:
        """Running totals of how rows were batched and adapters made resident (what a job records
        per data file): generation batches, generate calls, prefill and decode groups (one per
        call) with the sums of their union sizes, adapter loads, hits and evictions, probe passes and
        generate calls halved for lack of device memory, the peak resident, seconds, and on CUDA the
        peak device memory against its budget (`device_memory`)."""
        s, counts = self.stats, self.pool.residency.counts
        return {"batches": s.generation_batches, "calls": s.calls, "groups": s.groups,
                "union_sum": s.union_sum, "decode_groups": s.decode_groups,
                "decode_union_sum": s.decode_union_sum, "loads": s.loads, "hits": s.hits,
                "evictions": s.evictions, "oom_splits": s.oom_splits, "peak_resident": counts.peak_adapters,
                "peak_resident_bytes": counts.peak_bytes, "grouping_seconds": round(s.grouping_seconds, 6),
                "generate_seconds": round(s.generate_seconds, 6), **self.device_memory()}

    def device_memory(self) -> dict[str, int]:
        """On CUDA, the most device memory this actor's tensors took (summed over its devices) and
        the budget it plans within: each device's memory less `memory_headroom` of it. Empty on the CPU."""
        devices = [d for d in self.pool.devices if d.type == "cuda"]
        if not devices:
            return {}
        total = sum(torch.cuda.get_device_properties(d).total_memory for d in devices)
        return {"peak_device_bytes": sum(torch.cuda.max_memory_allocated(d) for d in devices),
                "peak_device_budget_bytes": int(total * (1 - self.pool.memory_headroom))}

    def _count_batch(self, stats: BatchStats) -> None:
        self.stats.groups += len(stats.groups)
        self.stats.union_sum += sum(stats.union_sizes)
        self.stats.decode_groups += len(stats.decode_union_sizes)
        self.stats.decode_union_sum += sum(stats.decode_union_sizes)
        self.stats.generation_batches += stats.batches
        self.stats.grouping_seconds += stats.grouping_seconds
        self.stats.generate_seconds += stats.generate_seconds
        for name in ("calls", "loads", "hits", "evictions", "oom_splits"):
            setattr(self.stats, name, getattr(self.stats, name) + getattr(stats, name))
        self.stats.new_tokens += stats.new_tokens
