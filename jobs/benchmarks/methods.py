"""The methods compared: base model, PEFT baselines, the released code's procedure, Arrow, our engine.

Each `*_generate` function processes prompts and returns the new token ids per prompt (what the
tests compare); each `*_method` wraps one in a `Method` for timing. Every method generates exactly
`new_tokens` tokens per prompt (`min_new_tokens` = `max_new_tokens`), so all do the same work.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from torch import nn
from transformers import GenerationConfig, PreTrainedTokenizerBase

from actors.engine import LoGoEngine
from actors.mixture import install_mixture_layers
from actors.router import Routing
from jobs.benchmarks.measure import Method, clock


def fixed_length(tokenizer: PreTrainedTokenizerBase, new_tokens: int) -> GenerationConfig:
    """Greedy decoding of exactly `new_tokens` tokens (end-of-sequence suppressed until then)."""
    return GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)


def pad_left(seqs: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists -> left-padded (input_ids, attention_mask), each (B, L_max)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[b, width - len(s):] = 1
    return ids.to(device), mask.to(device)


def batches(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


@torch.inference_mode()
def hf_generate(model: nn.Module, seqs: list[list[int]], batch_size: int, gen: GenerationConfig,
                device: torch.device, adapter_names: list[str] | None = None) -> list[list[int]]:
    """Batched greedy generation with a transformers or PEFT model; optional per-row PEFT adapters."""
    out: list[list[int]] = []
    for start in range(0, len(seqs), batch_size):
        ids, mask = pad_left(seqs[start:start + batch_size], gen.pad_token_id, device)
        kwargs = {} if adapter_names is None else {"adapter_names": adapter_names[start:start + batch_size]}
        tokens = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen, **kwargs)
        out.extend(tokens[:, ids.shape[1]:].tolist())
    return out


def peft_pool_model(base: nn.Module, dirs: list[Path]) -> nn.Module:
    """`base` (modified in place) with every adapter of `dirs` loaded by PEFT, named by directory."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(base, dirs[0], adapter_name=dirs[0].name)
    for d in dirs[1:]:
        model.load_adapter(d, adapter_name=d.name)
    return model.eval()


def arrow_pool_model(base: nn.Module, dirs: list[Path], top_k: int) -> nn.Module:
    """`base` (modified in place) with PEFT Arrow routing over every adapter of `dirs`."""
    from peft import ArrowConfig, create_arrow_model

    config = ArrowConfig(top_k=min(top_k, len(dirs)))
    return create_arrow_model(base, task_specific_adapter_paths=[str(d) for d in dirs], arrow_config=config).eval()


def activate(engine: LoGoEngine) -> None:
    """Bind the model's mixture layers to `engine` (several engines share one model in the benchmark)."""
    install_mixture_layers(engine.model, list(engine.pool.modules), engine.state)


def ours_run(engine: LoGoEngine, seqs: list[list[int]], batch_size: int,
             routings: list[Routing] | None = None) -> tuple[list[str], dict]:
    """Our engine end to end (probe, group, generate), or generation only with given `routings`."""
    activate(engine)
    now = clock(engine.device)
    texts: list[str] = []
    probe = generate = 0.0
    groups, unions, decode_groups, decode_unions = [], [], [], []
    for start in range(0, len(seqs), batch_size):
        chunk = seqs[start:start + batch_size]
        t0 = now()
        rts = engine.route(chunk) if routings is None else routings[start:start + batch_size]
        t1 = now()
        out, _, stats = engine.generate(chunk, rts)
        generate += now() - t1
        probe += t1 - t0
        texts.extend(out)
        groups.append(len(stats.groups))
        unions.extend(stats.union_sizes)
        decode_groups.append(len(getattr(stats, "decode_groups", stats.groups)))
        decode_unions.extend(getattr(stats, "decode_union_sizes", stats.union_sizes))
    return texts, {"probe_s": probe, "generate_s": generate, "groups": sum(groups) / len(groups),
                   "mean_union": sum(unions) / len(unions), "max_union": max(unions),
                   "decode_groups": sum(decode_groups) / len(decode_groups),
                   "decode_mean_union": sum(decode_unions) / len(decode_unions)}


def synthetic_routings(rows: int, pool: int, k: int, cluster_rows: int, seed: int,
                       names: tuple[str, ...]) -> list[Routing]:
    """Selections of `k` of `pool` adapters with random weights; each run of `cluster_rows`
    consecutive rows shares one selection (cluster_rows=1: every row its own random selection).
    Rows of a cluster are spread over the batch (row b belongs to cluster b % n_clusters)."""
    rng = random.Random(seed)
    n_clusters = max(1, rows // cluster_rows)
    chosen = [tuple(sorted(rng.sample(range(pool), k))) for _ in range(n_clusters)]
    out = []
    for b in range(rows):
        idx = chosen[b % n_clusters]
        w = [rng.random() + 0.1 for _ in idx]
        out.append(Routing(indices=idx, adapters=tuple(names[i] for i in idx),
                           weights=tuple(v / sum(w) for v in w)))
    return out


def method(name: str, note: str, fn, prompts: int, new_tokens: int, weight_bytes: int) -> Method:
    """A Method whose run is `fn()` (returning extra figures or None)."""
    return Method(name=name, run=fn, prompts=prompts, new_tokens=prompts * new_tokens,
                  weight_bytes=weight_bytes, note=note)
