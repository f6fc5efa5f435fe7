"""The generation engine: route a batch, make its adapters resident, and generate with each row's mixture.

A batch runs as one generate call or several (cut by the residency's slots and by prompt length);
each call mixes all its rows at once: its (row, adapter) pairs, sorted by slot, are formed once
(`actors.mixture.SlotMix`), and every forward pass reads them.

A row whose routing weights, hidden states or logits overflow (an adapter with huge weights, or a
dtype too narrow for the mixture) is not reported as an output: `BatchStats.errors` names its cause, and
a row whose logits go bad is ended at once so that it costs no more decode steps.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Iterator

import torch
from torch import nn
from transformers import GenerationConfig as HFGenerationConfig
from transformers import LogitsProcessor, LogitsProcessorList, PreTrainedTokenizerBase

from actors.base import decoder_blocks
from actors.grouping import exact_length_buckets, length_buckets
from actors.mixture import MixtureState, SlotMix, install_mixture_layers
from actors.options import GenerationConfig, RoutingConfig
from actors.pool import AdapterPool
from actors import residency
from actors.residency import split_by_bound
from actors.router import Router, Routing
from actors.text import continuation


@dataclass
class BatchStats:
    """What happened to one batch: its generate calls (each one group of rows mixed together, in
    the prefill and in decode steps alike), their unions and timings."""

    rows: int = 0
    groups: list[tuple[int, ...]] = field(default_factory=list)  # row positions per group (one per call)
    union_sizes: list[int] = field(default_factory=list)
    decode_groups: list[tuple[int, ...]] = field(default_factory=list)  # the same groups, for decode steps
    decode_union_sizes: list[int] = field(default_factory=list)
    probe_seconds: float = 0.0
    generate_seconds: float = 0.0
    new_tokens: int = 0
    errors: dict[int, str] = field(default_factory=dict)  # row position -> why its output is not kept
    calls: int = 0  # generate calls (a batch is split by residency bound and by prompt length)
    loads: int = 0  # adapters read onto the device for this batch
    hits: int = 0  # adapters it needed that were already resident
    evictions: int = 0  # adapters dropped to make room
    grouping_seconds: float = 0.0  # time making each call's adapters resident and forming its slot pairs
    batches: int = 1  # generation batches these stats cover
    oom_splits: int = 0  # probe passes and generate calls that ran out of memory and were halved

    def absorb(self, other: "BatchStats", rows: list[int]) -> None:
        """Add the stats of a batch made of these rows (its positions map to `rows`)."""
        def mapped(groups):
            return [tuple(rows[p] for p in g) for g in groups]
        self.groups += mapped(other.groups)
        self.union_sizes += other.union_sizes
        self.decode_groups += mapped(other.decode_groups)
        self.decode_union_sizes += other.decode_union_sizes
        self.errors.update({rows[p]: why for p, why in other.errors.items()})
        for name in ("generate_seconds", "new_tokens", "calls", "loads", "hits", "evictions", "grouping_seconds",
                     "oom_splits"):
            setattr(self, name, getattr(self, name) + getattr(other, name))


def end_ids(model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Every id that ends a row: the tokenizer's end id and all of the model's
    `generation_config.eos_token_id` (several for chat models such as Llama-3.x-Instruct)."""
    ids: list[int] = []
    sources = [tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)]
    for value in sources:
        for i in (value if isinstance(value, (list, tuple)) else [value]):
            if i is not None and int(i) not in ids:
                ids.append(int(i))
    return ids


class OverflowWatch(LogitsProcessor):
    """Finds rows whose numbers overflow during generation and ends them at once.

    Two signs, per row and step: the residual stream leaving the last block, at the position being
    decoded (rows are left-padded), has a mean square that is not finite (the final norm then
    divides by infinity and the row's logits collapse to a constant), or the logits hold NaN or
    +inf (or are -inf everywhere): either way `max(logits) + mean(h^2)` is not finite. The first
    step showing it is recorded, and from then on the row's next token is an end id, so it costs no
    further decode steps. About ten ops per step, all on the device (no synchronisation).
    """

    NONE = 2**62  # "no bad step yet"

    def __init__(self, batch: int, end_id: int, device: torch.device):
        self.first = torch.full((batch, 1), self.NONE, dtype=torch.long, device=device)  # (B, 1) first bad step
        self.end_id, self.step = end_id, 0
        self.h: torch.Tensor | None = None  # (B, d): the last block's output at the decoded position
        self.forced: torch.Tensor | None = None  # (1, V): logits that pick the end id

    @property
    def first_bad(self) -> list[int | None]:
        """Per row, the first step that showed an overflow, or None."""
        return [None if s >= self.NONE else s for s in self.first[:, 0].tolist()]

    def block_output(self, _module, _args, output) -> None:
        """Forward hook on the last decoder block."""
        self.h = (output[0] if isinstance(output, tuple) else output)[:, -1]  # (B, d)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        # -inf is how other processors forbid a token (e.g. min_new_tokens), so only NaN, +inf, or a row
        # with every token at -inf counts: exactly the rows whose largest logit is not finite
        sign = scores.amax(dim=-1, keepdim=True)  # (B, 1)
        if self.h is not None:
            h = self.h if self.h.dtype == torch.float32 else self.h.float()
            sign = sign + h.pow(2).mean(dim=-1, keepdim=True).to(sign.device)  # (B, 1)
        self.first = torch.minimum(self.first, torch.where(torch.isfinite(sign), self.NONE, self.step))
        if self.forced is None:
            self.forced = torch.full_like(scores[:1], float("-inf"))  # (1, V)
            self.forced[0, self.end_id] = 0.0
        self.step += 1
        return torch.where(self.first < self.NONE, self.forced, scores)  # (B, V)


def check_bound(pool: AdapterPool, routing: RoutingConfig) -> None:
    """Refuse a residency bound whose slots cannot hold one row's k adapters at once
    (`residency.check_bound`, the check the job's driver makes too)."""
    if pool.budgets:  # auto on a GPU: the slots the free memory gives, at start-up
        k = min(routing.max_k, len(pool))
        if pool.slots < k:
            raise ValueError(f"max_resident=auto holds {pool.slots} adapter slots, fewer than one prompt's k={k} "
                             f"adapters: {'; '.join(pool.budget_lines())}. Lower resources.batch_size or "
                             "generation.max_prompt_tokens (the KV cache reserved), resources.memory_headroom, "
                             "or give the actor a device with more memory")
        return
    residency.check_bound(pool.bound, routing.max_k, pool.slot_nbytes, len(pool))


class LoGoEngine:
    """A base model with an adapter pool: routes prompts and generates with their mixtures."""

    def __init__(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, pool: AdapterPool,
                 routing: RoutingConfig, generation: GenerationConfig, calibration=None):
        self.model, self.tokenizer, self.pool = model, tokenizer, pool
        self.routing, self.generation = routing, generation
        self.router = Router(model, pool, routing, calibration)
        check_bound(pool, routing)
        self.state = MixtureState(storage={m: (pool.A[m].transpose(1, 2), pool.B[m])
                                           for m in pool.modules})  # (S, d_in, r), (S, r, d_out)
        install_mixture_layers(model, list(pool.modules), self.state)
        self.device = next(model.parameters()).device
        self.end_ids = end_ids(model, tokenizer)
        self.last_block = decoder_blocks(model)[1][-1]
        self.hf_config = HFGenerationConfig(
            max_new_tokens=generation.max_new_tokens, do_sample=False,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=self.end_ids or None,
            stop_strings=list(generation.stops) or None,
        )

    def set_routing(self, routing: RoutingConfig, calibration=None) -> None:
        """Route with new options (e.g. calibrated scores once statistics exist)."""
        check_bound(self.pool, routing)
        self.routing, self.router = routing, Router(self.model, self.pool, routing, calibration)

    def pad(self, seqs: list[list[int]], side: str = "left") -> tuple[torch.Tensor, torch.Tensor]:
        """Token id lists -> (input_ids, attention_mask), each (B, L_max), padded on `side`."""
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for b, s in enumerate(seqs):
            sl = slice(width - len(s), width) if side == "left" else slice(0, len(s))
            ids[b, sl] = torch.tensor(s, dtype=torch.long)
            mask[b, sl] = 1
        return ids.to(self.device), mask.to(self.device)

    def route(self, seqs: list[list[int]], stats: BatchStats | None = None) -> list[Routing | None]:
        """Route each tokenised prompt (adapters off; one partial forward pass per length bucket).

        A row's routing does not depend on the rows padded with it, so buckets change only the cost
        (in float32 to its rounding, 1e-6; in bfloat16 and float16 rows of one length run together,
        unpadded, so it is exact). A pass out of memory is halved (`split_on_oom`); a row that runs out of memory alone gets
        None, and its error in `stats.errors` (which must then be given).
        """
        if self.pool.dtype != torch.float32:  # see `exact_length_buckets`
            buckets = exact_length_buckets([len(s) for s in seqs])
        elif len(seqs) < 2 or self.generation.probe_bucket_overhead == float("inf"):
            buckets = [list(range(len(seqs)))]
        else:
            buckets = length_buckets([len(s) for s in seqs], self.generation.probe_bucket_overhead)
        routings: list[Routing | None] = [None] * len(seqs)
        for bucket in buckets:
            routed = self.split_on_oom(bucket, lambda rows: self.router.route(*self.pad([seqs[r] for r in rows])),
                                       seqs, stats, "routing")
            for row, routing in zip(bucket, routed):
                routings[row] = routing
        return routings

    def split_on_oom(self, rows: list[int], run, seqs: list[list[int]], stats: BatchStats | None,
                     what: str) -> list:
        """`run(rows)` (one result per row); on running out of device memory, the cache is freed and
        each half of the rows runs again, down to one row. A row out of memory alone gets None and
        an error in `stats.errors` naming its prompt length (with no `stats`, the error is raised)."""
        try:
            return list(run(rows))
        except torch.OutOfMemoryError:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            if len(rows) == 1 and stats is None:
                raise
            if len(rows) == 1:
                stats.errors[rows[0]] = (
                    f"out of device memory {what} this row alone ({len(seqs[rows[0]])} prompt tokens, "
                    f"max_new_tokens={self.generation.max_new_tokens}): shorten the prompt (max_prompt_tokens), "
                    "lower max_new_tokens, or give the actor a device with more memory")
                return [None]
            if stats is not None:
                stats.oom_splits += 1
            half = len(rows) // 2
            return (self.split_on_oom(rows[:half], run, seqs, stats, what)
                    + self.split_on_oom(rows[half:], run, seqs, stats, what))

    @contextmanager
    def mixing(self, routings: list[Routing], widths: tuple[int, ...] = (1,)) -> Iterator[SlotMix | None]:
        """Within the block, every forward pass of the model applies row b's mixture `routings[b]`.
        The union of all rows must fit the pool's slots (see `calls`). The group ends (and per-row
        weights) of passes of each of `widths` tokens per row are made here (decode steps: 1), others
        on first use. Yields the mixture of the first device (the only one without a device map)."""
        slots = self.pool.acquire_slots(i for r in routings for i in r.indices)
        mixes: dict[torch.device, SlotMix] = {}
        if slots:
            selections = [[slots[i] for i in r.indices] for r in routings]
            weights = [list(r.weights) for r in routings]
            for device in self.pool.devices:  # each device's layers read its own copy of the call's indices
                mix = mixes[device] = SlotMix(selections, weights, self.pool.slots, device, self.pool.dtype)
                for width in widths:
                    mix.offs(width)
                    for r in set(self.pool.slot_ranks.values()):
                        if width > r:  # a prefill of this width multiplies rows by their slots (`_rows_mix`)
                            mix.rank_weights(r)
        self.state.mix = mixes or None
        try:
            yield next(iter(mixes.values()), None)
        finally:
            self.state.mix = None

    def calls(self, seqs: list[list[int]], routings: list[Routing]) -> list[list[int]]:
        """A batch cut into generate calls: parts whose union of adapters fits the residency bound
        (rows sharing adapters together), each cut by prompt length (`generate_step_slots`)."""
        parts = split_by_bound([r.indices for r in routings], self.pool.sizes(), self.pool.capacity)
        overhead = self.generation.generate_step_slots * self.generation.max_new_tokens
        out = []
        for part in parts:
            if len(part) < 2 or overhead == float("inf"):
                out.append(part)
                continue
            out.extend([part[i] for i in bucket] for bucket in length_buckets([len(seqs[r]) for r in part], overhead))
        return out

    @torch.inference_mode()
    def generate(self, seqs: list[list[int]], routings: list[Routing]) -> tuple[list[str], list[int], BatchStats]:
        """Greedy generation with each row's mixture. Returns texts, new-token counts, stats.

        Rows in `stats.errors` (routing weights or logits not finite) have no output: their text
        is empty and must not be reported as a result. The batch runs as one generate call or
        several (`calls`); a row's output does not depend on which.
        """
        stats = BatchStats(rows=len(seqs))
        routings = list(routings)
        for row, routing in enumerate(routings):
            if not all(map(math.isfinite, routing.weights)):
                bad = [a for a, w in zip(routing.adapters, routing.weights) if not math.isfinite(w)]
                stats.errors[row] = (
                    f"routing weights are not finite (adapters {bad} scored NaN or inf): their factors are "
                    "too large for the routing scores; check those adapters' weights (lora_B, lora_alpha)")
                routings[row] = Routing(indices=routing.indices, adapters=routing.adapters,
                                        weights=(0.0,) * len(routing.weights))  # generate harmlessly
        counts_before = replace(self.pool.residency.counts)
        texts, counts = [""] * len(seqs), [0] * len(seqs)
        t0 = time.perf_counter()
        for part in self.calls(seqs, routings):
            results = self.split_on_oom(part, lambda rows: self._generate_call(rows, seqs, routings, stats),
                                        seqs, stats, "generating")
            for row, result in zip(part, results):
                texts[row], counts[row] = result or ("", 0)
        stats.generate_seconds = time.perf_counter() - t0
        now = self.pool.residency.counts
        stats.loads, stats.hits = now.loads - counts_before.loads, now.hits - counts_before.hits
        stats.evictions = now.evictions - counts_before.evictions
        stats.new_tokens = sum(counts)
        return texts, counts, stats

    def _generate_call(self, part: list[int], seqs: list[list[int]], routings: list[Routing],
                       stats: BatchStats) -> list[tuple[str, int]]:
        """One generate call over rows `part` of the batch: (text, new-token count) per row; adds
        its group and errors to `stats` once it has run."""
        t0 = time.perf_counter()
        input_ids, attention_mask = self.pad([seqs[r] for r in part])
        watch = OverflowWatch(len(part), self.end_ids[0] if self.end_ids else self.tokenizer.pad_token_id,
                              input_ids.device)
        handle = self.last_block.register_forward_hook(watch.block_output)
        try:
            with self.mixing([routings[r] for r in part], widths=(1, input_ids.shape[1])):
                stats.grouping_seconds += time.perf_counter() - t0
                out = self.model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                          generation_config=self.hf_config, tokenizer=self.tokenizer,
                                          logits_processor=LogitsProcessorList([watch]))
        finally:
            handle.remove()
        union = len({i for r in part for i in routings[r].indices})  # all rows of a call mix at once
        stats.calls += 1
        stats.groups.append(tuple(part))
        stats.union_sizes.append(union)
        stats.decode_groups.append(tuple(part))
        stats.decode_union_sizes.append(union)
        new = out[:, input_ids.shape[1]:].tolist()
        results = []
        for pos, (tokens, row) in enumerate(zip(new, part)):
            text, count = self.decode(tokens, seqs[row])
            results.append((text, count))
            step = watch.first_bad[pos]
            if step is not None and step <= count and row not in stats.errors:
                r, dtype = routings[row], str(self.pool.dtype).removeprefix("torch.")
                fix = "check those adapters" + ("" if dtype == "float32" else ", or run with dtype float32")
                stats.errors[row] = (
                    f"the hidden states or logits overflowed (NaN or inf) at new token {step + 1} with adapters "
                    f"{list(r.adapters)} (weights {[round(w, 4) for w in r.weights]}) in {dtype}: an adapter's "
                    f"weights are too large for the model; {fix}")
        return results

    def decode(self, tokens: list[int], prompt: list[int] = ()) -> tuple[str, int]:
        """New tokens of one row -> (text cut at the first stop, number of tokens generated); the
        text reads as it follows `prompt` (`actors.text.continuation`)."""
        ends = set(self.end_ids) | {self.tokenizer.pad_token_id}
        n = next((i for i, t in enumerate(tokens) if t in ends), len(tokens))  # finished rows are padded
        text = continuation(self.tokenizer, list(prompt), tokens[:n])
        for stop in self.generation.stops:
            cut = text.find(stop)
            if cut >= 0:
                text = text[:cut]
        return text, n
