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
    shapes: dict[str, tuple[int, int, int]] | None = None
    """Module path -> (rank, d_in, d_out) of every module the adapter adapts, from its file's header;
    None when `factors` holds them all (a read of only some modules' tensors keeps the others' here)."""

    @property
    def nbytes(self) -> int:
        return sum(f.A.nbytes + f.B.nbytes for f in self.factors.values())

    def module_shapes(self) -> dict[str, tuple[int, int, int]]:
        """Module path -> (rank, d_in, d_out) of every module the adapter adapts, read or not."""
        if self.shapes is not None:
            return self.shapes
        return {m: (f.rank, int(f.A.shape[1]), int(f.B.shape[0])) for m, f in self.factors.items()}


# safetensors dtype -> bytes per element; its own limit on the header size.
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
               "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
MAX_HEADER_BYTES = 100 * 2**20


def _pattern_value(patterns: Mapping[str, float], module: str, default: float) -> float:
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches a module path suffix."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_fields(name: str, config: dict, config_file: Path) -> None:
    """Types of the fields the mixture reads: r, lora_alpha, use_rslora, rank_pattern, alpha_pattern."""
    def bad(key, value, want):
        return AdapterError(f"adapter {name!r}: {key}={value!r} in {config_file} must be {want}; fix the file "
                            "(peft writes it with save_pretrained)")
    if "r" in config and not (isinstance(config["r"], int) and not isinstance(config["r"], bool) and config["r"] >= 1):
        raise bad("r", config["r"], "an integer >= 1")
    if "lora_alpha" in config and not _is_number(config["lora_alpha"]):
        raise bad("lora_alpha", config["lora_alpha"], "a finite number")
    if not isinstance(config.get("use_rslora", False), bool):
        raise bad("use_rslora", config["use_rslora"], "true or false")
    for field, want_int in (("rank_pattern", True), ("alpha_pattern", False)):
        patterns = config.get(field) or {}
        if not isinstance(patterns, dict):
            raise bad(field, patterns, "a mapping of module-name patterns to numbers")
        for key, value in patterns.items():
            try:
                re.compile(rf"(.*\.)?({key})$")
            except re.error as exc:
                raise AdapterError(f"adapter {name!r}: {field} key {key!r} in {config_file} is not a valid regular "
                                   f"expression ({exc}); fix or remove it") from None
            ok = (isinstance(value, int) and not isinstance(value, bool) and value >= 1) if want_int else _is_number(value)
            if not ok:
                raise bad(f"{field}[{key!r}]", value, "an integer >= 1" if want_int else "a finite number")


def _read_config(name: str, path: Path) -> dict:
    config_file = _inside(name, path, CONFIG_FILE)
    if not config_file.is_file():
        raise AdapterError(f"adapter {name!r}: {config_file} is missing; a PEFT adapter directory holds "
                           f"{CONFIG_FILE} and {WEIGHTS_FILE} (save it with peft's save_pretrained)")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterError(f"adapter {name!r}: {config_file} is not valid JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise AdapterError(f"adapter {name!r}: {config_file} holds a {type(config).__name__}, not a JSON object")
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise AdapterError(f"adapter {name!r}: peft_type is {config.get('peft_type')!r} in {config_file}; "
                           "only LoRA adapters (peft_type LORA) can be routed and mixed")
    for flag, why in UNSUPPORTED_FLAGS.items():
        if config.get(flag):
            raise AdapterError(f"adapter {name!r}: {flag}={config[flag]!r} in {config_file}: {why}")
    _check_fields(name, config, config_file)
    return config


def _inside(name: str, path: Path, file: str) -> Path:
    """`path / file`, refused when it is a link that leads out of the adapter directory."""
    target = path / file
    if target.is_symlink() and not target.resolve().is_relative_to(path.resolve()):
        raise AdapterError(f"adapter {name!r}: {target} is a link to {target.resolve()}, outside the adapter "
                           "directory; copy the file into the adapter directory")
    return target


def read_header(name: str, weights_file: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from a safetensors header, checked against the file's size before any
    tensor is read: the header length, each tensor's dtype, shape and byte range."""
    size = weights_file.stat().st_size
    def corrupt(why):
        return AdapterError(f"adapter {name!r}: {weights_file} is not a valid safetensors file: {why}; "
                            "re-save the adapter with peft's save_pretrained")
    with weights_file.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise corrupt(f"only {size} bytes")
        n = int.from_bytes(head, "little")
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise corrupt(f"its header declares {n} bytes, the file has {size}")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise corrupt(f"its header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise corrupt("its header is not a JSON object")
    data_bytes, shapes = size - 8 - n, {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        dtype, shape, offsets = (info.get(k) if isinstance(info, dict) else None
                                 for k in ("dtype", "shape", "data_offsets"))
        if (dtype not in DTYPE_BYTES or not isinstance(shape, list)
                or not all(isinstance(d, int) and d >= 0 for d in shape)
                or not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets))):
            raise corrupt(f"tensor {key!r} has a malformed entry {info!r}")
        begin, end = offsets
        if not 0 <= begin <= end <= data_bytes or end - begin != math.prod(shape) * DTYPE_BYTES[dtype]:
            raise corrupt(f"tensor {key!r} ({dtype} {shape}) declares bytes {begin}..{end}, but the file holds "
                          f"{data_bytes} bytes of data")
        shapes[key] = tuple(shape)
    return shapes


def header_shapes(path: Path) -> dict[str, tuple[int, int, int]] | None:
    """Module path -> (rank, d_in, d_out) declared by an adapter directory's safetensors header (a
    few KiB read), or None when the header cannot say (`read_adapter` then names what is wrong)."""
    try:
        declared: dict[str, dict[str, tuple[int, ...]]] = {}
        for key, shape in read_header(path.name, Path(path) / WEIGHTS_FILE).items():
            m = KEY_RE.match(key)
            if m is None or len(shape) != 2:
                return None
            declared.setdefault(m["module"], {})[m["factor"]] = shape
        return {module: (pair["A"][0], pair["A"][1], pair["B"][0]) for module, pair in declared.items()}
    except (OSError, AdapterError, KeyError):
        return None


def read_adapter(name: str, path: str | Path, model: nn.Module | None = None,
                 only: tuple[str, ...] | None = None) -> Adapter:
    """Read one PEFT LoRA adapter directory (safetensors only) into CPU float32 factors.

    The safetensors header is checked first (sizes against the file; with `model`, every factor's
    shape against its base module), so a file declaring huge tensors is refused before reading them.
    `only`: read the tensors of just the modules whose last name is in it (the routing index's);
    the others' shapes come from the header (`Adapter.shapes`), their tensors unread (so unchecked
    for NaN until a full read).
    """
    path = Path(path)
    if not path.is_dir():
        raise AdapterError(f"adapter {name!r}: {path} is not a directory")
    weights_file = _inside(name, path, WEIGHTS_FILE)
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
    rank_pattern = config.get("rank_pattern") or {}

    declared: dict[str, dict[str, tuple[int, ...]]] = {}
    keys: dict[str, dict[str, str]] = {}
    for key, shape in read_header(name, weights_file).items():
        m = KEY_RE.match(key)
        if m is None:
            if "lora_embedding" in key or "lora_magnitude" in key:
                raise AdapterError(f"adapter {name!r}: tensor {key!r} in {weights_file} is not a linear "
                                   "LoRA factor (embedding LoRA and DoRA are not supported)")
            raise AdapterError(f"adapter {name!r}: unexpected tensor {key!r} in {weights_file}; "
                               "expected only '<module>.lora_A.weight' / '<module>.lora_B.weight'")
        declared.setdefault(m["module"], {})[m["factor"]] = shape
        keys.setdefault(m["module"], {})[m["factor"]] = key
    for module, pair in sorted(declared.items()):
        if set(pair) != {"A", "B"}:
            missing = "lora_B" if "A" in pair else "lora_A"
            raise AdapterError(f"adapter {name!r}: module {module!r} has no {missing} weight in {weights_file}")
        A, B = pair["A"], pair["B"]
        if len(A) != 2 or len(B) != 2 or A[0] != B[1]:
            raise AdapterError(f"adapter {name!r}: module {module!r} has lora_A {A} and lora_B "
                               f"{B}; expected (r, d_in) and (d_out, r) with the same r")
        if A[0] < 1:
            raise AdapterError(f"adapter {name!r}: module {module!r} has rank 0; rank must be >= 1")
        want = _pattern_value(rank_pattern, module, config.get("r", A[0]))
        if want != A[0]:
            raise AdapterError(f"adapter {name!r}: module {module!r} has rank {A[0]} in {weights_file}, but "
                               f"{CONFIG_FILE} declares r={want} for it (r / rank_pattern); the files do not "
                               "belong together")
        if model is not None:
            _check_shapes(name, module, A, B, model)

    if not declared:
        raise AdapterError(f"adapter {name!r}: {weights_file} holds no LoRA factors")
    wanted = [m for m in sorted(declared) if only is None or m.rsplit(".", 1)[-1] in only]
    factors = {}
    with safe_open(str(weights_file), framework="pt") as f:
        for module in wanted:
            A = f.get_tensor(keys[module]["A"]).to(torch.float32)
            B = f.get_tensor(keys[module]["B"]).to(torch.float32)
            if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
                raise AdapterError(f"adapter {name!r}: module {module!r} has NaN or infinite weights in "
                                   f"{weights_file}; the adapter is corrupt or diverged in training")
            r = int(A.shape[0])
            a = float(_pattern_value(alpha_pattern, module, alpha))
            scale = a / math.sqrt(r) if use_rslora else a / r
            factors[module] = LoraFactors(A=A, B=B, scale=scale)
    shapes = None if only is None else {m: (pair["A"][0], pair["A"][1], pair["B"][0]) for m, pair in declared.items()}
    return Adapter(name=name, path=path, factors=factors, shapes=shapes)


def _check_shapes(name: str, module: str, a_shape: tuple[int, ...], b_shape: tuple[int, ...], model: nn.Module) -> None:
    """The factors of `module` fit a Linear layer of `model`, with a rank no larger than the layer's sides."""
    try:
        target = model.get_submodule(module)
    except AttributeError:
        raise AdapterError(
            f"adapter {name!r}: module {module!r} does not exist in the base model; the adapter "
            "was trained for another architecture (check base_model_name_or_path in its config)") from None
    target = getattr(target, "base_layer", target)  # already wrapped for mixing (or by PEFT)
    if not isinstance(target, nn.Linear):
        raise AdapterError(f"adapter {name!r}: module {module!r} is a {type(target).__name__}, "
                           "not a Linear layer; only LoRA on Linear layers is supported")
    d_out, d_in = target.weight.shape
    if a_shape[1] != d_in or b_shape[0] != d_out:
        raise AdapterError(
            f"adapter {name!r}: module {module!r} factor shapes lora_A {tuple(a_shape)}, lora_B "
            f"{tuple(b_shape)} do not fit the base layer ({d_out} x {d_in}); expected lora_A (r, {d_in}) "
            f"and lora_B ({d_out}, r): the adapter belongs to a different base model")
    if a_shape[0] > max(d_in, d_out):
        raise AdapterError(f"adapter {name!r}: module {module!r} declares rank {a_shape[0]}, above the layer's "
                           f"sides ({d_out} x {d_in}); the adapter file is corrupt")


def validate_adapter(adapter: Adapter, model: nn.Module) -> None:
    """Check that every adapted module exists in `model`, is a Linear layer, and matches the shapes."""
    for module, (r, d_in, d_out) in adapter.module_shapes().items():  # read or only declared
        _check_shapes(adapter.name, module, (r, d_in), (d_out, r), model)


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
        for name, p in sources.items():
            if not p.resolve().is_relative_to(root.resolve()):
                raise AdapterError(f"adapter {name!r}: {p} is a link to {p.resolve()}, outside the pool {root}; "
                                   "copy the adapter into the pool, or pass a mapping {name: path} to use it")
    if not sources:
        raise AdapterError(f"adapter pool {adapters!s} is empty; LoGo needs at least one adapter")
    return sources
