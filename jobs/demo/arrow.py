"""The peer: PEFT's Arrow routing (`peft.create_arrow_model`) over the same adapter pool.

Arrow routes per token and per layer: top-k adapters by |<v_i, h>|, with v_i the top right singular
vector of adapter i's B A at that layer, and a softmax over the selected. It is training-free like
LoGo but routes every token instead of once per prompt.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from jobs.demo.tasks import extract_answer


def arrow_model(base: nn.Module, adapter_dirs: list[Path], top_k: int = 3,
                temperature: float = 1.0) -> nn.Module:
    """Wrap `base` (modified in place: pass a copy) with every adapter and PEFT's Arrow router."""
    from peft import ArrowConfig, create_arrow_model

    config = ArrowConfig(top_k=min(top_k, len(adapter_dirs)), router_temperature=temperature)
    model = create_arrow_model(base, task_specific_adapter_paths=[str(p) for p in adapter_dirs],
                               arrow_config=config)
    return model.eval()


@torch.inference_mode()
def arrow_generate(model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: list[str],
                   max_new_tokens: int, batch_size: int = 32) -> list[str]:
    """Greedy outputs (first line, stripped) of the Arrow model, left-padded batches."""
    tokenizer.padding_side = "left"
    answers: list[str] = []
    for start in range(0, len(prompts), batch_size):
        enc = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True)
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        answers.extend(extract_answer(t) for t in texts)
    return answers
