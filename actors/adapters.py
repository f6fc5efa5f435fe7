"""Adapter identity and loading: read PEFT-format LoRA adapters and check them against the base model.

An adapter is a directory with `adapter_config.json` and `adapter_model.safetensors`. Only those two
files are read; pickle checkpoints (`adapter_model.bin`) are refused. Every check runs before any
prompt is processed, and each error names the adapter, the file or module, and the fix.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from safetensors import safe_open
from torch import nn

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
KEY_RE = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<factor>A|B)(?:\.[^.]+)?\.weight$")

# adapter_config.json fields whose non-default values change the math in ways we do not implement.
UNSUPPORTED_FLAGS = {
    "use_dora": "DoRA adapters are not supported; use a plain LoRA adapter",
    "lora_bias": "LoRA bias terms are not supported; retrain with lora_bias=False",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D bases such as GPT-2) is not supported",
    "modules_to_save": "modules_to_save replaces whole modules, which cannot be mixed per row",
    "trainable_token_indices": "trainable token embeddings are not supported",
    "layer_replication": "layer_replication is not supported",
}


class AdapterError(ValueError):
    """An adapter that cannot be used with this base model; the message names the fix."""


@dataclass(frozen=True)
class LoraFactors:
    """One adapted module of one adapter: delta(x) = scale * B (A x)."""

    A: torch.Tensor  # (r, d_in)
    B: torch.Tensor  # (d_out, r)
    scale: float  # lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])


@dataclass(frozen=True)
class Adapter:
    """A LoRA adapter read from disk: its name, source and factors keyed by base-module path."""

    name: str
    path: Path
    factors: dict[str, LoraFactors]

    @property
    def nbytes(self) -> int:
        return sum(f.A.nbytes + f.B.nbytes for f in self.factors.values())


def _pattern_value(patterns: Mapping[str, float], module: str, default: float) -> float:
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches a module path suffix."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _read_config(name: str, path: Path) -> dict:
    config_file = path / CONFIG_FILE
    if not config_file.is_file():
        raise AdapterError(f"adapter {name!r}: {config_file} is missing; a PEFT adapter directory holds "
                           f"{CONFIG_FILE} and {WEIGHTS_FILE} (save it with peft's save_pretrained)")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise AdapterError(f"adapter {name!r}: {config_file} is not valid JSON ({exc})") from exc
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise AdapterError(f"adapter {name!r}: peft_type is {config.get('peft_type')!r} in {config_file}; "
                           "only LoRA adapters (peft_type LORA) can be routed and mixed")
    for flag, why in UNSUPPORTED_FLAGS.items():
        if config.get(flag):
            raise AdapterError(f"adapter {name!r}: {flag}={config[flag]!r} in {config_file}: {why}")
    return config


def read_adapter(name: str, path: str | Path) -> Adapter:
    """Read one PEFT LoRA adapter directory (safetensors only) into CPU float32 factors."""
    path = Path(path)
    if not path.is_dir():
        raise AdapterError(f"adapter {name!r}: {path} is not a directory")
    weights_file = path / WEIGHTS_FILE
    if not weights_file.is_file():
        pickles = [p for p in PICKLE_FILES if (path / p).is_file()]
        if pickles:
            raise AdapterError(
                f"adapter {name!r}: {path / pickles[0]} is a pickle checkpoint; only safetensors is loaded "
                f"(convert it with peft: load it and save_pretrained(..., safe_serialization=True) to "
                f"get {WEIGHTS_FILE})")
        raise AdapterError(f"adapter {name!r}: {weights_file} is missing")
    config = _read_config(name, path)
    use_rslora = bool(config.get("use_rslora", False))
    alpha = float(config.get("lora_alpha", config.get("r", 8)))
    alpha_pattern = config.get("alpha_pattern") or {}

    halves: dict[str, dict[str, torch.Tensor]] = {}
    with safe_open(str(weights_file), framework="pt") as f:
        for key in f.keys():
            m = KEY_RE.match(key)
            if m is None:
                if "lora_embedding" in key or "lora_magnitude" in key:
                    raise AdapterError(f"adapter {name!r}: tensor {key!r} in {weights_file} is not a linear "
                                       "LoRA factor (embedding LoRA and DoRA are not supported)")
                raise AdapterError(f"adapter {name!r}: unexpected tensor {key!r} in {weights_file}; "
                                   "expected only '<module>.lora_A.weight' / '<module>.lora_B.weight'")
            halves.setdefault(m["module"], {})[m["factor"]] = f.get_tensor(key).to(torch.float32)

    factors = {}
    for module, pair in sorted(halves.items()):
        if set(pair) != {"A", "B"}:
            missing = "lora_B" if "A" in pair else "lora_A"
            raise AdapterError(f"adapter {name!r}: module {module!r} has no {missing} weight in {weights_file}")
        A, B = pair["A"], pair["B"]
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
            raise AdapterError(f"adapter {name!r}: module {module!r} has lora_A {tuple(A.shape)} and lora_B "
                               f"{tuple(B.shape)}; expected (r, d_in) and (d_out, r) with the same r")
        r = int(A.shape[0])
        if r < 1:
            raise AdapterError(f"adapter {name!r}: module {module!r} has rank 0; rank must be >= 1")
        if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
            raise AdapterError(f"adapter {name!r}: module {module!r} has NaN or infinite weights in "
                               f"{weights_file}; the adapter is corrupt or diverged in training")
        a = float(_pattern_value(alpha_pattern, module, alpha))
        scale = a / math.sqrt(r) if use_rslora else a / r
        factors[module] = LoraFactors(A=A, B=B, scale=scale)
    if not factors:
        raise AdapterError(f"adapter {name!r}: {weights_file} holds no LoRA factors")
    return Adapter(name=name, path=path, factors=factors)


def validate_adapter(adapter: Adapter, model: nn.Module) -> None:
    """Check that every adapted module exists in `model`, is a Linear layer, and matches the shapes."""
    for module, f in adapter.factors.items():
        try:
            target = model.get_submodule(module)
        except AttributeError:
            raise AdapterError(
                f"adapter {adapter.name!r}: module {module!r} does not exist in the base model; the adapter "
                "was trained for another architecture (check base_model_name_or_path in its config)") from None
        target = getattr(target, "base_layer", target)  # already wrapped for mixing (or by PEFT)
        if not isinstance(target, nn.Linear):
            raise AdapterError(f"adapter {adapter.name!r}: module {module!r} is a {type(target).__name__}, "
                               "not a Linear layer; only LoRA on Linear layers is supported")
        d_out, d_in = target.weight.shape
        if f.A.shape[1] != d_in or f.B.shape[0] != d_out:
            raise AdapterError(
                f"adapter {adapter.name!r}: module {module!r} factor shapes lora_A {tuple(f.A.shape)}, lora_B "
                f"{tuple(f.B.shape)} do not fit the base layer ({d_out} x {d_in}); expected lora_A (r, {d_in}) "
                f"and lora_B ({d_out}, r): the adapter belongs to a different base model")


def resolve_sources(adapters: str | Path | Mapping[str, str | Path]) -> dict[str, Path]:
    """Turn a pool directory (one sub-directory per adapter) or a name -> path mapping into a mapping."""
    if isinstance(adapters, Mapping):
        sources = {str(k): Path(v) for k, v in adapters.items()}
    else:
        root = Path(adapters)
        if not root.is_dir():
            raise AdapterError(f"adapter pool {root} is not a directory; pass a directory with one "
                               "sub-directory per adapter, or a mapping of name -> adapter directory")
        if (root / CONFIG_FILE).is_file():
            raise AdapterError(f"adapter pool {root} is itself a single adapter; pass its parent directory "
                               "or a mapping {name: path}")
        sources = {p.name: p for p in sorted(root.iterdir()) if p.is_dir() and not p.name.startswith(".")}
    if not sources:
        raise AdapterError(f"adapter pool {adapters!s} is empty; LoGo needs at least one adapter")
    return sources
