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


@dataclass(frozen=True)
class RoutingConfig:
    """How each prompt is routed."""

    k: int = 20
    """Number of adapters mixed per prompt; clamped to the pool size."""
    signal: str = "norm"
    """`norm`: s_i = ||o_i||_2. `entropy`: s_i = 1 / (H(softmax(o_i)) + 1e-6)."""
    probe_layer: int = -1
    """Block T whose input is probed; negative counts from the end (-1 is the last block)."""
    probe_module: str = "q_proj"
    """Name (last path component) of the module of block T whose LoRA outputs are scored."""
    probe_input: str = "residual"
    """`residual`: the residual stream entering block T; `module_input`: what the module receives."""

    def __post_init__(self):
        if not isinstance(self.k, int) or isinstance(self.k, bool) or self.k < 1:
            raise ValueError(f"k={self.k!r}: k must be an integer >= 1 (the number of adapters to mix)")
        if self.signal not in SIGNALS:
            raise ValueError(f"signal={self.signal!r} is not known; use one of {SIGNALS}")
        if self.probe_input not in PROBE_INPUTS:
            raise ValueError(f"probe_input={self.probe_input!r} is not known; use one of {PROBE_INPUTS}")
        if not isinstance(self.probe_layer, int) or isinstance(self.probe_layer, bool):
            raise ValueError(f"probe_layer={self.probe_layer!r} must be an integer block index")


@dataclass(frozen=True)
class Routing:
    """The adapters chosen for one prompt, highest weight first."""

    indices: tuple[int, ...]  # positions in the pool (name order)
    adapters: tuple[str, ...]
    weights: tuple[float, ...]  # sum to 1
    uniform_fallback: bool = False  # every selected score was 0, so weights are uniform


class _ProbeDone(Exception):
    """Raised by the probe hook to stop the forward pass at block T."""

    def __init__(self, hidden: torch.Tensor):
        self.hidden = hidden


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row, for left or right padding. (B,)"""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.bool() * positions).amax(dim=1)


class Router:
    """Scores every adapter of `pool` for each prompt from one partial, adapter-free forward pass."""

    def __init__(self, model: nn.Module, pool: AdapterPool, config: RoutingConfig, calibration=None):
        self.model, self.pool, self.config = model, pool, config
        self.calibration = calibration  # optional actors.calibration.Calibration
        blocks_path, blocks = decoder_blocks(model)
        n_blocks = len(blocks)
        if not -n_blocks <= config.probe_layer < n_blocks:
            raise ValueError(f"probe_layer={config.probe_layer} is out of range for a model with {n_blocks} "
                             f"blocks; use -{n_blocks}..{n_blocks - 1}")
        self.block_index = config.probe_layer % n_blocks
        self.block = blocks[self.block_index]
        prefix = f"{blocks_path}.{self.block_index}."
        matches = [m for m in pool.modules if m.startswith(prefix) and m.rsplit(".", 1)[-1] == config.probe_module]
        candidates = sorted({n.rsplit(".", 1)[-1] for n, mod in self.block.named_modules()
                             if isinstance(mod, nn.Linear)})
        if not matches:
            raise ValueError(
                f"probe_module={config.probe_module!r}: no adapter in the pool adapts it in block "
                f"{self.block_index}; the block's linear modules are {candidates} (pick one the adapters "
                "target, or a probe_layer they adapt)")
        self.module_path = matches[0]
        self.module = model.get_submodule(self.module_path)
        # Probe-module factors, padded to one rank, in float32 for stable scores.
        A_pad, B_pad, self.present = pool.padded(self.module_path)
        self.A_pad, self.B_pad = A_pad.float(), B_pad.float()  # (N, r, d_in), (N, d_out, r)
        self.k = min(config.k, len(pool))

    @torch.inference_mode()
    def probe(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Hidden state h of each row's last real token at the input of block T (or of its module).

        input_ids, attention_mask: (B, L), padded on either side. Returns (B, d_in) in float32.
        Position ids come from the mask, so padding does not shift a row's positions.
        """
        target = self.block if self.config.probe_input == "residual" else self.module

        def stop(_module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            raise _ProbeDone(hidden)

        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, L)
        handle = target.register_forward_pre_hook(stop, with_kwargs=True)
        try:
            self.model.base_model(input_ids=input_ids, attention_mask=attention_mask,
                             position_ids=position_ids, use_cache=False)
        except _ProbeDone as done:
            hidden = done.hidden  # (B, L, d_in)
        else:
            raise RuntimeError("the probe hook did not fire; block T was never reached")
        finally:
            handle.remove()
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return hidden[rows, last_token_index(attention_mask)].float()  # (B, d_in)

    def raw_scores(self, h: torch.Tensor) -> torch.Tensor:
        """LOGO_SPEC 1.3-1.4: scores (B, N) of o_i = c_i B_i A_i h; 0 for adapters lacking the module.

        Semantics:
            for b, i:  o = c_i * B_i @ (A_i @ h[b])
                       s[b, i] = ||o||_2                      (norm)
                       s[b, i] = 1 / (H(softmax(o)) + 1e-6)    (entropy)
        """
        u = torch.einsum("bd,nrd->bnr", h, self.A_pad)  # (B, N, r)
        o = torch.einsum("bnr,nor->bno", u, self.B_pad)  # (B, N, d_out)
        if self.config.signal == "norm":
            s = o.norm(dim=-1)  # (B, N)
        else:
            p = o.softmax(dim=-1)  # (B, N, d_out)
            entropy = -(p * torch.log(p + 1e-8)).sum(dim=-1)  # (B, N)
            s = 1.0 / (entropy + 1e-6)
        return torch.where(self.present, s, torch.zeros_like(s))

    def scores(self, h: torch.Tensor) -> torch.Tensor:
        """Raw scores, with per-adapter calibration applied when the router has one. (B, N)"""
        s = self.raw_scores(h)
        if self.calibration is not None:
            s = self.calibration.apply(s, self.present)
        return s

    def select(self, scores: torch.Tensor) -> list[Routing]:
        """LOGO_SPEC 1.5-1.6: top k by score (ties to the earlier name), weights s_i / sum_S s_j."""
        # Pool index order is name order and the sort is stable, so equal scores keep name order.
        order = torch.sort(scores.double(), dim=1, descending=True, stable=True).indices[:, : self.k]  # (B, k)
        top = torch.gather(scores.double(), 1, order)  # (B, k)
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
