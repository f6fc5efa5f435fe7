"""LoGo routing (LOGO_SPEC section 1): one probe pass with adapters off, per-adapter scores, top-k.

Routing is a pure function of (prompt, model, pool, config): the probe runs with every adapter
disabled, reads the hidden state of the last real prompt token (whatever the padding side), stops
at block T (no later block, no LM head), and ties are broken by adapter name.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from actors.base import decoder_blocks
from actors.pool import AdapterPool

SIGNALS = ("norm", "entropy")
PROBE_INPUTS = ("residual", "module_input")
CALIBRATION_SCORES = ("raw", "ratio", "zscore")


@dataclass(frozen=True)
class RoutingConfig:
    """How each prompt is routed."""

    k: int = 20
    """Number of adapters mixed per prompt; clamped to the pool size."""
    signal: str = "norm"
    """`norm`: s_i = ||o_i||_2. `entropy`: s_i = 1 / (H(softmax(o_i)) + 1e-6)."""
    probe_layer: int = -1
    """Block T whose input is probed; negative counts from the end (-1 is the last block)."""
    probe_module: str | tuple[str, ...] = "q_proj"
    """Module of block T whose LoRA outputs are scored (last path component). Several names: the
    scores of each module are summed (after calibration, when calibrated)."""
    probe_input: str = "residual"
    """`residual`: the residual stream entering block T; `module_input`: what the module receives."""
    calibration_score: str = "raw"
    """`raw` (the paper), `ratio` (score / the adapter's mean score) or `zscore` ((score - mean) / std),
    with per-adapter statistics from unlabeled prompts (actors.calibration)."""

    def __post_init__(self):
        if not isinstance(self.k, int) or isinstance(self.k, bool) or self.k < 1:
            raise ValueError(f"k={self.k!r}: k must be an integer >= 1 (the number of adapters to mix)")
        if self.signal not in SIGNALS:
            raise ValueError(f"signal={self.signal!r} is not known; use one of {SIGNALS}")
        if self.probe_input not in PROBE_INPUTS:
            raise ValueError(f"probe_input={self.probe_input!r} is not known; use one of {PROBE_INPUTS}")
        if not isinstance(self.probe_layer, int) or isinstance(self.probe_layer, bool):
            raise ValueError(f"probe_layer={self.probe_layer!r} must be an integer block index")
        if not self.probe_modules or not all(isinstance(m, str) and m for m in self.probe_modules):
            raise ValueError(f"probe_module={self.probe_module!r}: give a module name such as 'q_proj' "
                             "or a list of names")
        if self.calibration_score not in CALIBRATION_SCORES:
            raise ValueError(f"calibration_score={self.calibration_score!r} is not known; use one of "
                             f"{CALIBRATION_SCORES}")

    @property
    def probe_modules(self) -> tuple[str, ...]:
        return (self.probe_module,) if isinstance(self.probe_module, str) else tuple(self.probe_module)


@dataclass(frozen=True)
class Routing:
    """The adapters chosen for one prompt, highest weight first."""

    indices: tuple[int, ...]  # positions in the pool (name order)
    adapters: tuple[str, ...]
    weights: tuple[float, ...]  # sum to 1
    uniform_fallback: bool = False  # every selected score was 0, so weights are uniform


class _ProbeDone(Exception):
    """Raised by a probe hook to stop the forward pass inside block T."""


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row, for left or right padding. (B,)"""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.bool() * positions).amax(dim=1)


class Router:
    """Scores every adapter of `pool` for each prompt from one partial, adapter-free forward pass."""

    def __init__(self, model: nn.Module, pool: AdapterPool, config: RoutingConfig, calibration=None):
        self.model, self.pool, self.config = model, pool, config
        blocks_path, blocks = decoder_blocks(model)
        n_blocks = len(blocks)
        if not -n_blocks <= config.probe_layer < n_blocks:
            raise ValueError(f"probe_layer={config.probe_layer} is out of range for a model with {n_blocks} "
                             f"blocks; use -{n_blocks}..{n_blocks - 1}")
        self.block_index = config.probe_layer % n_blocks
        self.block = blocks[self.block_index]
        prefix = f"{blocks_path}.{self.block_index}."
        candidates = sorted({n.rsplit(".", 1)[-1] for n, mod in self.block.named_modules()
                             if isinstance(mod, nn.Linear)})
        self.module_paths: list[str] = []
        for name in config.probe_modules:
            matches = [m for m in pool.modules if m.startswith(prefix) and m.rsplit(".", 1)[-1] == name]
            if not matches:
                raise ValueError(
                    f"probe_module={name!r}: no adapter in the pool adapts it in block {self.block_index}; the "
                    f"block's linear modules are {candidates} (pick one the adapters target, or a probe_layer "
                    "they adapt)")
            self.module_paths.append(matches[0])
        self.modules = [model.get_submodule(p) for p in self.module_paths]
        hidden = self.block_input_size()
        for path, module in zip(self.module_paths, self.modules):
            width = getattr(module, "base_layer", module).in_features
            if config.probe_input == "residual" and width != hidden:
                raise ValueError(f"probe_module {path!r} takes {width} inputs, not the residual width {hidden}; "
                                 "use probe_input='module_input' for it")
        # Probe-module factors, padded to one rank, in float32 for stable scores.
        self.factors = []  # per probe module: A_pad (N, r, d_in), B_pad (N, d_out, r), present (N,)
        for path in self.module_paths:
            A_pad, B_pad, present = pool.padded(path)
            self.factors.append((A_pad.float(), B_pad.float(), present))
        self.present = torch.stack([f[2] for f in self.factors])  # (M, N)
        self.calibration = calibration
        if config.calibration_score != "raw":
            if calibration is None:
                raise ValueError(f"calibration_score={config.calibration_score!r} needs calibration statistics: "
                                 "pass calibration=PATH (from `logo-batch calibrate`) or calibration_prompts")
            calibration.check(pool.names, self.describe())
        self.k = min(config.k, len(pool))

    def block_input_size(self) -> int:
        return int(self.model.config.hidden_size)

    def describe(self) -> dict:
        """The probe settings that calibration statistics must have been computed with."""
        return {"signal": self.config.signal, "probe_layer": self.block_index,
                "probe_modules": list(self.module_paths), "probe_input": self.config.probe_input}

    @torch.inference_mode()
    def probe(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[torch.Tensor]:
        """Hidden state h of each row's last real token at the input of block T (or of each module).

        input_ids, attention_mask: (B, L), padded on either side. Returns one (B, d_in) float32
        tensor per probe module. Position ids come from the mask, so padding does not shift a row.
        """
        captured: dict[int, torch.Tensor] = {}
        residual = self.config.probe_input == "residual"
        targets = [self.block] if residual else self.modules

        def hook(slot):
            def record(_module, args, kwargs):
                captured[slot] = args[0] if args else kwargs["hidden_states"]
                if len(captured) == len(targets):
                    raise _ProbeDone()
            return record

        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, L)
        handles = [t.register_forward_pre_hook(hook(i), with_kwargs=True) for i, t in enumerate(targets)]
        try:
            self.model.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                  position_ids=position_ids, use_cache=False)
        except _ProbeDone:
            pass
        else:
            raise RuntimeError("the probe hooks did not fire; block T was never reached")
        finally:
            for handle in handles:
                handle.remove()
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        last = last_token_index(attention_mask)
        hs = [captured[i][rows, last].float() for i in range(len(targets))]  # each (B, d_in)
        return hs * len(self.modules) if residual else hs

    def raw_scores(self, hs: list[torch.Tensor]) -> torch.Tensor:
        """LOGO_SPEC 1.3-1.4 per probe module: (B, M, N); 0 for adapters lacking the module.

        Semantics:
            for b, m, i:  o = c_i * B_i^m @ (A_i^m @ h_m[b])
                          s[b, m, i] = ||o||_2                      (norm)
                          s[b, m, i] = 1 / (H(softmax(o)) + 1e-6)    (entropy)
        """
        out = []
        for h, (A_pad, B_pad, present) in zip(hs, self.factors):
            u = torch.einsum("bd,nrd->bnr", h, A_pad)  # (B, N, r)
            o = torch.einsum("bnr,nor->bno", u, B_pad)  # (B, N, d_out)
            if self.config.signal == "norm":
                s = o.norm(dim=-1)  # (B, N)
            else:
                p = o.softmax(dim=-1)  # (B, N, d_out)
                entropy = -(p * torch.log(p + 1e-8)).sum(dim=-1)  # (B, N)
                s = 1.0 / (entropy + 1e-6)
            out.append(torch.where(present, s, torch.zeros_like(s)))
        return torch.stack(out, dim=1)  # (B, M, N)

    def scores(self, hs: list[torch.Tensor]) -> torch.Tensor:
        """Routing scores (B, N): per-module scores, calibrated when configured, summed over modules."""
        s = self.raw_scores(hs).double()  # (B, M, N)
        if self.config.calibration_score != "raw":
            s = self.calibration.apply(s, self.config.calibration_score)
        return s.sum(dim=1)  # (B, N)

    def select(self, scores: torch.Tensor) -> list[Routing]:
        """LOGO_SPEC 1.5-1.6: top k by score (ties to the earlier name), weights s_i / sum_S s_j.

        Negative (z-)scores count as 0 in the weights; if every selected score is 0, weights are uniform.
        """
        # Pool index order is name order and the sort is stable, so equal scores keep name order.
        scores = scores.double()
        order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, : self.k]  # (B, k)
        top = torch.gather(scores, 1, order).clamp(min=0.0)  # (B, k); z-scores below the mean weigh 0
        routings = []
        for idx, s in zip(order.tolist(), top.tolist()):
            total = sum(s)
            fallback = total <= 0.0
            weights = [1.0 / len(s)] * len(s) if fallback else [v / total for v in s]
            routings.append(Routing(indices=tuple(idx), adapters=tuple(self.pool.names[i] for i in idx),
                                    weights=tuple(weights), uniform_fallback=fallback))
        return routings

    def route(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[Routing]:
        return self.select(self.scores(self.probe(input_ids, attention_mask)))
