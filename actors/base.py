"""The base model: device and dtype choice, loading, and where its decoder blocks live."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    """`auto` picks CUDA when present, else the CPU; anything else is passed to torch.device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"device={device!r} is not a device; use 'auto', 'cpu', 'cuda' or 'cuda:N'") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but no CUDA device is visible; use device='auto' or 'cpu'")
    return resolved


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto` is bfloat16 on a GPU that supports it, float32 otherwise."""
    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; use one of {['auto', *DTYPES]}")
    return DTYPES[dtype]


def load_base(path: str | Path, dtype: torch.dtype, device: torch.device, gpus: int = 1,
              headroom: float = 0.0) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from a local directory, in eval mode, on `device`; with
    `gpus` > 1 on CUDA, spread over the first `gpus` visible devices (transformers' `device_map`,
    each device filled to at most `1 - headroom` of its memory, the rest left for adapter slots,
    the KV cache and activations)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ValueError(f"model={str(path)!r} is not a model directory (no config.json); pass a local "
                         "Hugging Face model directory (config.json, *.safetensors, tokenizer files)")
    hf_logging.disable_progress_bar()
    if gpus > 1 and device.type == "cuda":
        visible = torch.cuda.device_count()
        if visible < gpus:
            raise ValueError(f"gpus={gpus} but this process sees {visible} CUDA devices; give the actor that many "
                             "(resources.gpus_per_actor) or lower it")
        max_memory = {i: int(torch.cuda.mem_get_info(i)[1] * (1 - headroom)) for i in range(gpus)}
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map="auto", max_memory=max_memory)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    model = model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.requires_grad_(False)
    return model, tokenizer


def block_devices(model: nn.Module) -> list[torch.device]:
    """The device of each decoder block's weights, in order (one device unless a device map spread them)."""
    return [next(block.parameters()).device for block in decoder_blocks(model)[1]]


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The module path and ModuleList of the decoder blocks (`model.layers` for Llama-like models)."""
    n_layers = getattr(model.config, "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers and len(module) > 0:
            return name, module
    raise ValueError(f"cannot find the {n_layers} decoder blocks of {type(model).__name__}")


def context_length(model: nn.Module) -> int:
    """The longest sequence the model's position encoding is configured for."""
    return int(getattr(model.config, "max_position_embeddings", 2048))
