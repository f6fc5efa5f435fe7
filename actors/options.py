"""The predictor's options and output columns: the one definition of each, with no torch import.

    from actors.options import GenerationConfig, RoutingConfig
    LoGoPredictor(model, adapters, routing=RoutingConfig(k=3), generation=GenerationConfig(max_new_tokens=16))

`RoutingConfig` says how each prompt is routed, `GenerationConfig` how its output is generated once
routed. `LoGoPredictor` and `LoGoEngine` take them, and a job file's `routing:` and `generation:`
sections are built from them (`pipeline.config` adds the keys only a job has, such as where the
calibration statistics come from). A bad value raises ValueError naming the key and the fix,
`key: what is wrong and what to give; got value`. The job reads them without loading torch.

`RETIRED` names the generation options of earlier versions that no longer change anything (the
grouping of rows: every generate call now mixes all its rows at once, see `actors.mixture`): a job
file may still hold them (read and ignored, with a warning); the predictor's keywords refuse them.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Mapping

from actors.batching import ORDERINGS

OUTPUT_COLUMNS = ("output", "adapters", "weights", "error", "warning", "prompt_tokens", "output_tokens")
"""Columns the predictor adds to every batch, in this order (a job's output puts `id` first)."""

SIGNALS = ("norm", "entropy")
PROBE_INPUTS = ("residual", "module_input")
CALIBRATION_SCORES = ("raw", "ratio", "zscore")
OVERLONG = ("truncate", "error")
ALL_BLOCKS = "all"

# The paper's method (LOGO_SPEC section 1): raw norm score at q_proj of the last block, k = 20.
PAPER_ROUTING = dict(k=20, signal="norm", probe_layers=-1, probe_module="q_proj", probe_input="residual",
                     calibration_score="raw")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check(ok: bool, key: str, message: str, value: Any) -> None:
    if not ok:
        raise ValueError(f"{key}: {message}; got {value!r}")


def _one_of(value: Any, allowed: tuple[str, ...], key: str) -> None:
    _check(value in allowed, key, f"must be one of {', '.join(allowed)}", value)


@dataclass(frozen=True)
class RoutingConfig:
    """How each prompt is routed. The defaults are the measured best (actors/README.md, "Calibrated routing");
    `PAPER_ROUTING` is the paper's method."""

    k: int = 1
    """Number of adapters mixed per prompt; clamped to the pool size."""
    signal: str = "norm"
    """`norm`: s_i = ||o_i||_2. `entropy`: s_i = 1 / (H(softmax(o_i)) + 1e-6)."""
    probe_layers: int | tuple[int, ...] | str = ALL_BLOCKS
    """Blocks whose input is probed: one block (an int, negative counts from the end, -1 = the last),
    a list, or `all`. The probe runs no block deeper than the deepest one asked."""
    probe_module: str | tuple[str, ...] = ("q_proj", "v_proj")
    """Module(s) of each probed block whose LoRA outputs are scored (last path component). With
    `probe_layers`, they define the (block, module) pairs whose scores are summed (after
    calibration, when calibrated); a pair that no adapter adapts is left out. A list is a set: kept
    sorted, so its order changes nothing (the router scores block-major, modules in this order)."""
    probe_input: str = "residual"
    """`residual`: the residual stream entering the block; `module_input`: what the module receives."""
    calibration_score: str = "zscore"
    """`raw` (the paper), `ratio` (score / the adapter's mean score) or `zscore` ((score - mean) / std),
    per pair, with per-adapter statistics from unlabeled prompts (actors.calibration)."""

    def __post_init__(self) -> None:
        _check(_is_int(self.k) and self.k >= 1, "k", "must be an integer >= 1 (the number of adapters mixed "
               "per prompt)", self.k)
        _one_of(self.signal, SIGNALS, "signal")
        _one_of(self.probe_input, PROBE_INPUTS, "probe_input")
        layers = self.probe_layers
        if isinstance(layers, list):
            object.__setattr__(self, "probe_layers", layers := tuple(layers))
        _check(layers == ALL_BLOCKS or _is_int(layers) or (
            isinstance(layers, tuple) and bool(layers) and all(_is_int(b) for b in layers)), "probe_layers",
            "give a block index (negative counts from the end, -1 = the last), a list of block indices, or all",
            layers)
        if isinstance(self.probe_module, list):
            object.__setattr__(self, "probe_module", tuple(self.probe_module))
        modules = (self.probe_module,) if isinstance(self.probe_module, str) else self.probe_module
        _check(isinstance(modules, tuple) and bool(modules) and all(isinstance(m, str) and m for m in modules),
               "probe_module", "holds an empty name or a non-string; give a module name such as q_proj, or a list "
               "of names", self.probe_module)
        _check(len(set(modules)) == len(modules), "probe_module", "lists a module twice; list each once", modules)
        if isinstance(self.probe_module, tuple):  # a set of names: the sum over pairs does not depend on order
            object.__setattr__(self, "probe_module", tuple(sorted(self.probe_module)))
        _one_of(self.calibration_score, CALIBRATION_SCORES, "calibration_score")

    @property
    def probe_modules(self) -> tuple[str, ...]:
        return (self.probe_module,) if isinstance(self.probe_module, str) else tuple(self.probe_module)

    def blocks(self, n_blocks: int) -> tuple[int, ...]:
        """The probed block indices (0..n_blocks-1), ascending; refuses indices out of range."""
        if self.probe_layers == ALL_BLOCKS:
            return tuple(range(n_blocks))
        asked = (self.probe_layers,) if _is_int(self.probe_layers) else self.probe_layers
        bad = [b for b in asked if not -n_blocks <= b < n_blocks]
        if bad:
            raise ValueError(f"probe_layers={self.probe_layers!r}: block {bad[0]} is out of range for a model with "
                             f"{n_blocks} blocks; use -{n_blocks}..{n_blocks - 1} or 'all'")
        return tuple(sorted({b % n_blocks for b in asked}))


@dataclass(frozen=True)
class GenerationConfig:
    """How outputs are generated once a batch is routed: decoding, prompt length, batching."""

    max_new_tokens: int = 64
    """Most new tokens per row (greedy decoding; a row also ends at its end-of-sequence token)."""
    stop_at_newline: bool = False
    """Stop a row at its first newline and keep only its first line (the paper's evaluation)."""
    stop_strings: tuple[str, ...] = ()
    """Stop a row when its output contains one of these; the output is cut before it."""
    overlong: str = "truncate"
    """A prompt longer than `max_prompt_tokens`: `truncate` (cut from the left, with a warning) or
    `error` (an error row)."""
    max_prompt_tokens: int | None = None
    """Longest prompt in tokens; None: the model's context length minus `max_new_tokens`."""
    probe_bucket_overhead: float = 64.0
    """Fixed cost of one more probe pass, in token slots: the probe runs the batch in buckets of
    similar prompt length, padded per bucket, chosen to minimise padded slots plus this per pass
    (raise it where small passes are inefficient, e.g. on GPUs; `inf`: one pass)."""
    generate_step_slots: float = 64.0
    """What one decode step of a generate call costs, in prompt-token slots of a prefill (a GPU reads
    every weight once per step: worth a few hundred slots; a CPU: a few dozen). A batch whose prompt
    lengths differ widely (one long prompt among short ones) is cut into generate calls of similar
    length, minimising padded prompt slots plus `max_new_tokens` x this per call (`inf`: one call
    per batch; see actors.grouping.length_buckets)."""
    ordering: str = "selection"
    """How the predictor forms its generation batches of `batch_size` rows from the rows it routed:
    `selection` (sorted by selected adapters, then prompt length: rows sharing adapters are
    generated together) or `input` (input order); see actors.batching."""

    def __post_init__(self) -> None:
        _check(_is_int(self.max_new_tokens) and self.max_new_tokens >= 1, "max_new_tokens",
               "must be an integer >= 1", self.max_new_tokens)
        _check(isinstance(self.stop_at_newline, bool), "stop_at_newline", "must be true or false",
               self.stop_at_newline)
        if isinstance(self.stop_strings, list):
            object.__setattr__(self, "stop_strings", tuple(self.stop_strings))
        _check(isinstance(self.stop_strings, tuple) and all(isinstance(s, str) and s for s in self.stop_strings),
               "stop_strings", "holds an empty string or a non-string; give a list of non-empty strings",
               self.stop_strings)
        _one_of(self.overlong, OVERLONG, "overlong")
        _check(self.max_prompt_tokens is None or _is_int(self.max_prompt_tokens) and self.max_prompt_tokens >= 1,
               "max_prompt_tokens", "must be an integer >= 1, or None for the model's context minus "
               "max_new_tokens", self.max_prompt_tokens)
        _one_of(self.ordering, ORDERINGS, "ordering")
        for key in ("probe_bucket_overhead", "generate_step_slots"):
            value = getattr(self, key)
            _check(_is_number(value) and value >= 0, key, "must be a number >= 0", value)

    @property
    def stops(self) -> tuple[str, ...]:
        return (("\n",) if self.stop_at_newline else ()) + tuple(self.stop_strings)


RETIRED = ("grouping", "max_groups", "group_overhead", "decode_union_cost", "time_groups")
"""Generation options of earlier versions that no longer change anything: read and ignored."""


def field_names(cls: type) -> tuple[str, ...]:
    """The option names of a config class, in order."""
    return tuple(f.name for f in fields(cls))


def build_options(routing: RoutingConfig | None, generation: GenerationConfig | None, shortcuts: Mapping[str, Any],
                  other_options: tuple[str, ...] = ()) -> tuple[RoutingConfig, GenerationConfig]:
    """The routing and generation options from the dataclasses given (or their defaults) and keyword
    shortcuts (`k=3`, `max_new_tokens=16`, and `probe_layer`, the single-block name of earlier
    versions). A shortcut that differs from a dataclass also given is refused, naming both; an
    unknown name is refused with the known ones (`other_options` first: the caller's own)."""
    shortcuts = dict(shortcuts)
    if "probe_layer" in shortcuts:
        if "probe_layers" in shortcuts:
            raise ValueError("pass probe_layers (one block, a list or 'all'), not also probe_layer")
        shortcuts["probe_layers"] = shortcuts.pop("probe_layer")
    retired = sorted(set(shortcuts) & set(RETIRED))
    if retired:
        raise ValueError(f"option(s) {retired} no longer change anything (every generate call mixes all its rows "
                         "at once, a fixed number of ops per module); remove them")
    unknown = sorted(set(shortcuts) - set(field_names(RoutingConfig) + field_names(GenerationConfig)))
    if unknown:
        known = other_options + field_names(RoutingConfig) + field_names(GenerationConfig)
        raise ValueError(f"unknown option(s) {unknown}; known options: {', '.join(known)}")
    built = []
    for name, given, cls in (("routing", routing, RoutingConfig), ("generation", generation, GenerationConfig)):
        if given is not None and not isinstance(given, cls):
            raise ValueError(f"{name}={given!r}: pass an actors.options.{cls.__name__}")
        mine = {key: shortcuts[key] for key in field_names(cls) if key in shortcuts}
        if given is None:
            built.append(cls(**mine))
            continue
        base = cls(**{key: getattr(given, key) for key in field_names(cls)})  # a job section's extra keys dropped
        merged = replace(base, **mine)
        for key, value in mine.items():
            if getattr(merged, key) != getattr(base, key):
                raise ValueError(f"{key}={value!r} and {name}={cls.__name__}({key}={getattr(base, key)!r}, ...) "
                                 f"disagree; set {key} in one place only")
        built.append(base)
    return built[0], built[1]
