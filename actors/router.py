"""LoGo routing (LOGO_SPEC sections 1 and 5): one probe pass with adapters off, per-pair scores, top-k.

Routing is a pure function of (prompt, model, pool, config): the probe runs with every adapter
disabled, reads the hidden state of the last real prompt token (whatever the padding side) at every
probed block, stops at the deepest one (no later block, no LM head), and ties are broken by name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from actors.base import decoder_blocks
from actors.index import pair_scores
from actors.options import RoutingConfig
from actors.pool import AdapterPool


@dataclass(frozen=True)
class Routing:
    """The adapters chosen for one prompt, highest weight first."""

    indices: tuple[int, ...]  # positions in the pool (name order)
    adapters: tuple[str, ...]
    weights: tuple[float, ...]  # sum to 1
    uniform_fallback: bool = False  # every selected score was 0, so weights are uniform
    confidence: float | None = None  # Router.confidence; None with raw (uncalibrated) scores
    base_only: bool = False  # confidence below routing.min_confidence: no adapter, the base model alone
    widened: bool = False  # confidence below routing.uncertain_below: uncertain_k adapters instead of k


def confidence_of(scores: torch.Tensor, rankable: torch.Tensor, n_pairs: int) -> torch.Tensor:
    """Candidate confidences per row from routing scores (B, N): (B, 2), the top score per pair and
    its margin over the second, both per pair (adapters not rankable, or scored -inf, left out).

    Semantics:
        S1, S2 = the two largest finite scores of the row (S2 = S1 when there is one)
        out[b] = (S1 / P, (S1 - S2) / P)
    """
    s = scores.double()
    s = torch.where(rankable.to(s.device) & torch.isfinite(s), s, torch.full_like(s, -math.inf))
    top = torch.topk(s, min(2, s.shape[1]), dim=1).values  # (B, <=2)
    first = top[:, 0]
    second = top[:, 1] if top.shape[1] > 1 else first
    second = torch.where(torch.isfinite(second), second, first)
    return torch.stack([first / n_pairs, (first - second) / n_pairs], dim=1)  # (B, 2)


class _ProbeDone(Exception):
    """Raised by a probe hook to stop the forward pass inside block T."""


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row, for left or right padding. (B,)"""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.bool() * positions).amax(dim=1)


class Router:
    """Scores every adapter of `pool` for each prompt from one partial, adapter-free forward pass.

    The scored pairs P are (block, module) for every probed block and probe module that some adapter
    adapts; scores are summed over P (LOGO_SPEC section 5), calibrated per pair when configured.
    """

    def __init__(self, model: nn.Module, pool: AdapterPool, config: RoutingConfig, calibration=None):
        self.model, self.pool, self.config = model, pool, config
        blocks_path, blocks = decoder_blocks(model)
        self.blocks = blocks
        block_ids = config.blocks(len(blocks))
        self.pairs: list[tuple[int, str]] = []  # (block, module path), block-major
        for b in block_ids:
            prefix = f"{blocks_path}.{b}."
            for name in config.probe_modules:
                self.pairs.extend((b, m) for m in pool.modules if m.startswith(prefix) and m.rsplit(".", 1)[-1] == name)
        for name in config.probe_modules:
            if any(p.rsplit(".", 1)[-1] == name for _, p in self.pairs):
                continue
            linear = sorted({n.rsplit(".", 1)[-1] for n, mod in blocks[block_ids[-1]].named_modules()
                             if isinstance(mod, nn.Linear)})
            if name not in linear or len(config.probe_modules) == 1:
                where = f"block {block_ids[0]}" if len(block_ids) == 1 else f"blocks {block_ids[0]}..{block_ids[-1]}"
                raise ValueError(
                    f"probe_module={name!r}: no adapter in the pool adapts it in {where}; the block's linear "
                    f"modules are {linear} (pick one the adapters target, or probe_layers they adapt)")
        hidden = int(model.config.hidden_size)
        for _, path in self.pairs:
            width = getattr(model.get_submodule(path), "base_layer", model.get_submodule(path)).in_features
            if config.probe_input == "residual" and width != hidden:
                raise ValueError(f"probe_module {path!r} takes {width} inputs, not the residual width {hidden}; "
                                 "use probe_input='module_input' for it")
        if config.signal == "entropy" and not pool.routing_index.with_B:
            raise ValueError("signal='entropy' needs the whole LoRA output: load the pool with index_with_B=True")
        self.factors = [pool.routing_index.get(path) for _, path in self.pairs]
        present = torch.stack([f.present for f in self.factors])  # (P, N)
        self.calibration = calibration
        if config.calibration_score != "raw":
            if calibration is None:
                raise ValueError(f"calibration_score={config.calibration_score!r} needs calibration statistics: "
                                 "pass calibration=PATH (from `logo-batch calibrate`) or calibration_prompts")
            calibration.check(pool.names, self.describe())
            present = present & calibration.valid(config.calibration_score).to(present.device)
        # An adapter scores at a pair only where it adapts the module (and, calibrated, where its
        # statistics are not degenerate); elsewhere it gets the pair's floor and never outranks one that does.
        self.informative = present  # (P, N)
        self.rankable = present.any(dim=0)  # (N,): informative at some pair
        self.k = min(config.k, len(pool))
        self.max_k = min(config.max_k, len(pool))

    def describe(self) -> dict:
        """The probe settings that calibration statistics must have been computed with."""
        return {"signal": self.config.signal, "probe_input": self.config.probe_input,
                "pairs": [path for _, path in self.pairs]}

    @torch.inference_mode()
    def probe(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[torch.Tensor]:
        """Hidden state h of each row's last real token at every pair (block input or module input).

        input_ids, attention_mask: (B, L), padded on either side. Returns one (B, d_in) float32
        tensor per pair. Position ids come from the mask, so padding does not shift a row. Only the
        last real token's state is kept, and the pass stops on entering the deepest probed block
        (residual) or once every probed module has its input (module_input).
        """
        residual = self.config.probe_input == "residual"
        keys = sorted({b for b, _ in self.pairs}) if residual else [p for _, p in self.pairs]
        targets = [self.blocks[b] for b in keys] if residual else [self.model.get_submodule(p) for p in keys]
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        last = last_token_index(attention_mask)  # (B,)
        captured: dict = {}
        index_device = self.pool.routing_index.device

        def hook(key):
            def record(_module, args, kwargs):
                states = args[0] if args else kwargs["hidden_states"]  # (B, L, d)
                d = states.device  # a block's own under a device map; the index's for the scores
                captured[key] = states[rows.to(d), last.to(d)].float().to(index_device)  # (B, d)
                if len(captured) == len(targets):
                    raise _ProbeDone()
            return record

        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, L)
        handles = [t.register_forward_pre_hook(hook(key), with_kwargs=True) for key, t in zip(keys, targets)]
        try:
            self.model.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                  position_ids=position_ids, use_cache=False)
        except _ProbeDone:
            pass
        else:
            raise RuntimeError("the probe hooks did not fire; the probed blocks were never reached")
        finally:
            for handle in handles:
                handle.remove()
        return [captured[b if residual else p] for b, p in self.pairs]

    def raw_scores(self, hs: list[torch.Tensor]) -> torch.Tensor:
        """LOGO_SPEC 1.3-1.4 per pair: (B, P, N); 0 for adapters lacking the pair's module."""
        return torch.stack([pair_scores(h, f, self.config.signal) for h, f in zip(hs, self.factors)], dim=1)

    def scores(self, hs: list[torch.Tensor]) -> torch.Tensor:
        """Routing scores (B, N) from the probed states: `combine(raw_scores(hs))`."""
        return self.combine(self.raw_scores(hs))

    def combine(self, raw: torch.Tensor) -> torch.Tensor:
        """Routing scores (B, N) from raw per-pair scores (B, P, N): calibrated when configured, summed.

        Semantics:
            s[b, p, i] = raw score, or calibrated: raw / mean[p, i] (ratio), (raw - mean) / std (zscore)
            where adapter i is not informative at p: s[b, p, i] = min(0, min_j informative s[b, p, j])
            S[b, i] = sum_p s[b, p, i]
        """
        s = raw.double()  # (B, P, N)
        if self.config.calibration_score != "raw":
            s = self.calibration.apply(s, self.config.calibration_score)
        informative = self.informative.unsqueeze(0)  # (1, P, N)
        floor = torch.where(informative, s, torch.full_like(s, math.inf)).amin(dim=2, keepdim=True).clamp(max=0.0)
        return torch.where(informative, s, floor).sum(dim=1)  # (B, N)

    def confidence(self, scores: torch.Tensor) -> list[float | None]:
        """Each row's confidence from its routing scores (B, N): the top adapter's calibrated score
        per scored pair (LOGO_SPEC section 6); None per row with raw scores (nothing calibrates them).

        Semantics:
            zscore: conf[b] = max_i S[b, i] / |P|      how many standard deviations the best adapter's
                                                         score is above its mean on unlabeled prompts,
                                                         per pair (about 0: fits no better than average)
            ratio:  conf[b] = max_i S[b, i] / |P| - 1   its relative excess over its mean (0: average)

        A pure function of the row's scores (the pool and the statistics fixed), so batching changes it
        no more than it changes the scores; not finite only where a score is not (an error row).
        """
        if self.config.calibration_score == "raw":
            return [None] * scores.shape[0]
        top = confidence_of(scores, self.rankable, len(self.pairs))[:, 0]  # (B,)
        if self.config.calibration_score == "ratio":
            top = top - 1.0
        return top.tolist()

    def select(self, scores: torch.Tensor) -> list[Routing]:
        """LOGO_SPEC 1.5-1.6: top k by score (ties to the earlier name), weights s_i / sum_S s_j;
        with `min_confidence`, a row whose confidence is below it gets no adapter (`base_only`); with
        `uncertain_below`, a row whose confidence is below that (and not below min_confidence) gets the
        top `uncertain_k` instead of k (`widened`).

        Adapters informative at no pair rank after all others. Negative (z-)scores count as 0 in the
        weights; if every selected score is <= 0, weights are uniform; a selected score that is not
        finite (factors too large for float32) gets weight NaN, the others 0 (the engine makes such a
        row an error naming those adapters).
        """
        # Pool index order is name order and the sort is stable, so equal scores keep name order.
        scores = scores.double()
        key = torch.where(self.rankable.to(scores.device), scores, torch.full_like(scores, -math.inf))
        order = torch.sort(key, dim=1, descending=True, stable=True).indices[:, : self.max_k]  # (B, max k)
        top = torch.gather(scores, 1, order).clamp(min=0.0)  # (B, max k); z-scores below the mean weigh 0
        routings = []
        threshold, wide = self.config.min_confidence, self.config.uncertain_below
        for idx, s, conf in zip(order.tolist(), top.tolist(), self.confidence(scores)):
            if threshold is not None and conf is not None and conf < threshold:
                routings.append(Routing(indices=(), adapters=(), weights=(), confidence=conf, base_only=True))
                continue
            widened = wide is not None and conf is not None and conf < wide and self.max_k > self.k
            k = self.max_k if widened else self.k
            idx, s = idx[:k], s[:k]
            total = sum(s)
            fallback = total <= 0.0
            weights = [1.0 / len(s)] * len(s) if fallback else [v / total for v in s]
            if not math.isfinite(total):  # a score overflowed: only its own weight says so (NaN)
                weights = [0.0 if math.isfinite(v) else math.nan for v in s]
            routings.append(Routing(indices=tuple(idx), adapters=tuple(self.pool.names[i] for i in idx),
                                    weights=tuple(weights), uniform_fallback=fallback, confidence=conf,
                                    widened=widened))
        return routings

    def route(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[Routing]:
        return self.select(self.scores(self.probe(input_ids, attention_mask)))
