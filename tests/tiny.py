"""Tiny, locally built models, tokenizers and PEFT adapters for tests (no hub access needed).

`tiny_model_dir(path)` writes a small random Llama (config, safetensors weights, a character-level
tokenizer) that `transformers.AutoModelForCausalLM.from_pretrained` loads; `tiny_adapter(...)` writes
a PEFT-format LoRA adapter (adapter_config.json + adapter_model.safetensors) with non-zero B factors.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]
CHARS = sorted(set(string.printable) - set("\x0b\x0c\r"))


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer: one token per printable ASCII character."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("(?m)."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def tiny_model_dir(
    path: Path,
    *,
    hidden: int = 64,
    layers: int = 4,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    max_positions: int = 512,
    seed: int = 0,
    init_range: float = 0.2,
) -> Path:
    """Write a random tiny Llama with a character-level tokenizer to `path` and return it.

    A large `init_range` makes greedy decoding decisive (no near-ties between logits), so that
    implementations that agree to float32 rounding also agree token for token.
    """
    path = Path(path)
    tokenizer = tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        initializer_range=init_range,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # special tokens get zero logits, so greedy decoding never ends early
        model.lm_head.weight[: len(SPECIAL)] = 0.0
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def tiny_adapter(
    model_dir: Path,
    out_dir: Path,
    *,
    r: int = 4,
    alpha: float = 8,
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj"),
    use_rslora: bool = False,
    seed: int = 0,
    b_scale: float = 1.0,
    layers_to_transform: list[int] | None = None,
) -> Path:
    """Save a PEFT LoRA adapter for the model at `model_dir` with random, non-zero A and B."""
    from peft import LoraConfig, get_peft_model

    base = LlamaForCausalLM.from_pretrained(model_dir)
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=list(target_modules),
        use_rslora=use_rslora,
        init_lora_weights=False,
        layers_to_transform=layers_to_transform,
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(seed)
    peft_model = get_peft_model(base, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_A" in name:
                param.normal_(0.0, 0.3)
            elif "lora_B" in name:
                param.normal_(0.0, 0.3 * b_scale)
    peft_model.save_pretrained(out_dir)
    return Path(out_dir)


def tiny_pool(model_dir: Path, root: Path, n: int, *, seed: int = 0) -> Path:
    """Write `n` PEFT-format adapters `p000` .. for the model at `model_dir` directly with
    safetensors (fast enough for pools of hundreds): ranks 2, 4 or 8, on q_proj and v_proj, some
    also on k_proj and o_proj, with varied strengths."""
    import json

    from safetensors.torch import save_file

    config = LlamaConfig.from_pretrained(model_dir)
    head_dim = config.hidden_size // config.num_attention_heads
    d_out = {"q_proj": config.hidden_size, "k_proj": config.num_key_value_heads * head_dim,
             "v_proj": config.num_key_value_heads * head_dim, "o_proj": config.hidden_size}
    g = torch.Generator().manual_seed(seed)
    root = Path(root)
    for i in range(n):
        r = (2, 4, 8)[i % 3]
        targets = ("q_proj", "v_proj") if i % 2 else ("q_proj", "k_proj", "v_proj", "o_proj")
        strength = 0.2 + 0.4 * float(torch.rand(1, generator=g))
        tensors = {}
        for layer in range(config.num_hidden_layers):
            for m in targets:
                prefix = f"base_model.model.model.layers.{layer}.self_attn.{m}"
                tensors[f"{prefix}.lora_A.weight"] = torch.randn(r, config.hidden_size, generator=g) * 0.3
                tensors[f"{prefix}.lora_B.weight"] = torch.randn(d_out[m], r, generator=g) * strength
        out = root / f"p{i:03d}"
        out.mkdir(parents=True)
        save_file(tensors, str(out / "adapter_model.safetensors"))
        (out / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 2 * r,
            "target_modules": list(targets), "lora_dropout": 0.0, "bias": "none"}))
    return root
