"""Benchmark inputs: base models, synthetic adapter pools (in memory and in PEFT format), prompts."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from actors.adapters import Adapter, LoraFactors
from jobs.benchmarks.config import Regime, Shape

SPECIAL = ("<pad>", "</s>", "<s>", "<unk>")


def word_tokenizer(vocab: int) -> PreTrainedTokenizerFast:
    """A whitespace tokenizer over the words t4 .. t{vocab-1} (prompts are drawn as token ids)."""
    words = {tok: i for i, tok in enumerate(SPECIAL)}
    words.update({f"t{i}": i for i in range(len(SPECIAL), vocab)})
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", bos_token="<s>",
                                   unk_token="<unk>")


def random_model(shape: Shape, seed: int, max_positions: int = 2048) -> LlamaForCausalLM:
    """A random-weight Llama of `shape` in eval mode (float32, CPU)."""
    config = LlamaConfig(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        max_position_embeddings=max_positions, pad_token_id=0, eos_token_id=1, bos_token_id=2, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # special tokens are never generated, so every output is plain words
        model.lm_head.weight[: len(SPECIAL)] = 0.0
    return model


def base_model(shape: Shape, seed: int) -> tuple[nn.Module, PreTrainedTokenizerBase, str]:
    """The base model of `shape`, its tokenizer, and where its weights came from.

    A shape with `pretrained="smollm2"` uses the converted SmolLM2-135M-Instruct when
    `jobs.demo.model.ensure_demo_model` can provide it, and random weights with its config otherwise.
    """
    if shape.pretrained == "smollm2":
        try:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            from jobs.demo.model import ensure_demo_model

            path = ensure_demo_model()
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
            tokenizer = AutoTokenizer.from_pretrained(path)
            if tokenizer.pad_token_id is None:
                tokenizer.pad_token = tokenizer.eos_token
            return model, tokenizer, f"pretrained ({path})"
        except Exception as exc:  # no converted copy here: its config with random weights
            return random_model(shape, seed), word_tokenizer(shape.vocab), f"random weights ({exc})"
    return random_model(shape, seed), word_tokenizer(shape.vocab), "random weights"


def clone(model: nn.Module) -> nn.Module:
    """An independent copy (PEFT and the engine both modify their model in place)."""
    return copy.deepcopy(model).eval().requires_grad_(False)


def module_paths(model: nn.Module, targets: tuple[str, ...]) -> list[str]:
    """Paths of the Linear modules named in `targets`, in every block."""
    return [name for name, mod in model.named_modules()
            if isinstance(mod, nn.Linear) and name.rsplit(".", 1)[-1] in targets and ".layers." in name]


def synthetic_pool(model: nn.Module, shape: Shape, n: int, seed: int, root: Path | None = None) -> list[Adapter]:
    """`n` random rank-`shape.rank` adapters on `shape.targets`, named a000, a001, ...

    Adapters differ in overall strength (log-normal), as trained pools do, so routing by norm has
    preferences. With `root`, each adapter is also written there in PEFT format.
    """
    g = torch.Generator().manual_seed(seed)
    paths = module_paths(model, shape.targets)
    alpha = 2.0 * shape.rank
    adapters = []
    for i in range(n):
        strength = float(torch.empty(1).log_normal_(0.0, 0.5, generator=g))
        factors = {}
        for path in paths:
            d_out, d_in = model.get_submodule(path).weight.shape
            A = torch.randn(shape.rank, d_in, generator=g) / d_in ** 0.5
            B = torch.randn(d_out, shape.rank, generator=g) * (0.02 * strength)
            factors[path] = LoraFactors(A=A, B=B, scale=alpha / shape.rank)
        name = f"a{i:03d}"
        path = root / name if root is not None else Path(name)
        adapter = Adapter(name=name, path=path, factors=factors)
        if root is not None:
            write_peft(adapter, path, shape, alpha)
        adapters.append(adapter)
    return adapters


def write_peft(adapter: Adapter, path: Path, shape: Shape, alpha: float) -> None:
    """Save `adapter` as a PEFT LoRA adapter directory (adapter_config.json + safetensors)."""
    path.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for module, f in adapter.factors.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = f.A.contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = f.B.contiguous()
    save_file(tensors, str(path / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": shape.rank, "lora_alpha": alpha,
              "target_modules": list(shape.targets), "lora_dropout": 0.0, "bias": "none",
              "fan_in_fan_out": False, "use_rslora": False, "base_model_name_or_path": shape.name}
    (path / "adapter_config.json").write_text(json.dumps(config, indent=1))


def prompts(regime: Regime, n: int, vocab: int, seed: int) -> list[list[int]]:
    """`n` prompts of token ids with lengths drawn uniformly in [prompt_min, prompt_max]."""
    rng = random.Random(seed)
    return [[rng.randrange(len(SPECIAL), vocab) for _ in range(rng.randint(regime.prompt_min, regime.prompt_max))]
            for _ in range(n)]


def tensor_bytes(*objs: nn.Module | torch.Tensor) -> int:
    """Bytes of the parameters and buffers of modules, or of tensors (shared storage counted once)."""
    seen, total = set(), 0
    for obj in objs:
        tensors = list(obj.parameters()) + list(obj.buffers()) if isinstance(obj, nn.Module) else [obj]
        for t in tensors:
            key = (t.untyped_storage().data_ptr(), t.device)
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()
    return total


def held_tensors(obj: object) -> list[torch.Tensor]:
    """Tensors an object holds in its attributes (directly or in lists and tuples, one level deep)."""
    found = []
    for value in vars(obj).values():
        items = value if isinstance(value, (list, tuple)) else [value]
        for item in items:
            parts = item if isinstance(item, (list, tuple)) else [item]
            found.extend(t for t in parts if isinstance(t, torch.Tensor))
    return found
