"""Train the shipped adapter pool: one LoRA adapter per demo task on SmolLM2-135M-Instruct.

Rebuild every adapter (2 to 8 minutes per task, about 40 in all, on 2 CPU cores):

    python -m jobs.demo.train --task all

The BIG-bench pool (`--suite bigbench`: one adapter per task of `jobs.demo.bigbench.POOL_TASKS`,
into `jobs/demo/bigbench_adapters/`, a task with subtasks in `<task>__<subtask>`) is trained the
same way on each task's training split, with the settings of `BIGBENCH_TRAIN`:

    python -m jobs.demo.train --suite bigbench --task all

Each adapter is trained on its task's training split only, with the loss on the answer tokens
(the prompt is masked), then rounded to float16 and saved in PEFT format into
`jobs/demo/adapters/<task>/`. Base and adapter are then scored by exact match on the task's
validation split with plain PEFT greedy generation; the numbers and the settings go into
`jobs/demo/adapters/training_report.json`. On a machine shared with other jobs, setting
OMP_WAIT_POLICY=PASSIVE in the environment keeps idle torch threads from spinning (same results).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from jobs.demo import ADAPTER_DIR, BIGBENCH_ADAPTER_DIR
from jobs.demo.data import SplitConfig, check_row, task_seed, task_split
from jobs.demo.model import ensure_demo_model
from jobs.demo.tasks import TASK_NAMES, extract_answer

REPORT_NAME = "training_report.json"
BASE_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


@dataclass(frozen=True)
class TrainConfig:
    """Settings shared by every adapter of the pool (recorded in the training report)."""

    rank: int = 8
    """LoRA rank r."""
    alpha: int = 16
    """LoRA alpha; the adapter's scale is alpha / rank."""
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    """Adapted linear modules, in every decoder block."""
    lr: float = 2e-3
    """Peak AdamW learning rate (linear warm-up, then cosine decay to 10% over `max_steps`)."""
    warmup_steps: int = 10
    """Linear warm-up steps."""
    batch_size: int = 8
    """Sequences per optimiser step."""
    max_steps: int = 150
    """Upper bound on optimiser steps per task."""
    min_steps: int = 40
    """Steps before early stopping may end training."""
    eval_every: int = 20
    """Validation exact match is measured every this many steps (after `min_steps`); 0: only once
    training ends (no early stopping)."""
    target_em: float = 0.95
    """Training stops early once validation exact match reaches this."""
    max_new_tokens: int = 12
    """Greedy generation length for validation."""
    threads: int = 2
    """torch intra-op threads (the reference machine has 2 CPU cores)."""


BIGBENCH_TRAIN = TrainConfig(lr=4e-3, batch_size=4, max_steps=10, min_steps=10, eval_every=0, warmup_steps=2,
                             max_new_tokens=16)
"""The BIG-bench pool's settings: a fixed 10 steps of 4 sequences per task (about 2 minutes each on 2
CPU cores shared with other work); each report entry records its own steps, batch size and rate."""


def _encode(tokenizer, rows: list[dict[str, str]]) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels) per row: prompt tokens then " answer\\n", loss on the answer only."""
    out = []
    for row in rows:
        prompt = tokenizer(row["prompt"], add_special_tokens=False).input_ids
        answer = tokenizer(" " + row["answer"] + "\n", add_special_tokens=False).input_ids
        out.append((prompt + answer, [-100] * len(prompt) + answer))
    return out


def _collate(pairs: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in pairs)
    ids = torch.full((len(pairs), width), pad_id)  # (B, T)
    labels = torch.full((len(pairs), width), -100)  # (B, T)
    mask = torch.zeros((len(pairs), width), dtype=torch.long)  # (B, T)
    for i, (x, y) in enumerate(pairs):
        ids[i, : len(x)], labels[i, : len(y)], mask[i, : len(x)] = torch.tensor(x), torch.tensor(y), 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@torch.no_grad()
def exact_match(model, tokenizer, rows: list[dict[str, str]], max_new_tokens: int,
                batch_size: int = 20, check=check_row) -> float:
    """Share of rows whose greedy output (first line, stripped) passes `check` (the task's checker)."""
    model.eval()
    tokenizer.padding_side = "left"
    correct = 0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        enc = tokenizer([r["prompt"] for r in chunk], return_tensors="pt", padding=True,
                        add_special_tokens=False)
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        texts = tokenizer.batch_decode(out[:, enc.input_ids.shape[1] :], skip_special_tokens=True)
        correct += sum(check(r, extract_answer(t)) for r, t in zip(chunk, texts))
    return correct / len(rows)


def _lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def _save_float16(model, out_dir: Path) -> None:
    """Save in PEFT format, then store the tensors as float16 (half the size)."""
    model.save_pretrained(out_dir)
    (out_dir / "README.md").unlink(missing_ok=True)  # PEFT's empty model card
    weights = out_dir / "adapter_model.safetensors"
    tensors = {k: v.to(torch.float16).contiguous() for k, v in load_file(weights).items()}
    save_file(tensors, weights, metadata={"format": "pt"})
    weights.chmod(0o644)
    config_path = out_dir / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = BASE_MODEL_ID
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def train_task(name: str, base, tokenizer, cfg: TrainConfig, splits: SplitConfig,
               out_root: Path, log=print, rows: tuple[list, list] | None = None, check=check_row,
               out_name: str | None = None) -> dict[str, float | int | str]:
    """Train, round to float16, score and save one task's adapter; returns its report entry.

    `rows` (training, validation) and `check` default to the generated demo suite's; the adapter
    goes to `out_root / (out_name or name)`.
    """
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(task_seed(name, splits.seed))
    rng = random.Random(task_seed(name, splits.seed))
    if rows is None:
        rows = task_split(name, "train", splits), task_split(name, "validation", splits)
    train_rows, val_rows = rows
    lora = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, target_modules=list(cfg.target_modules),
                      lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(base, lora)
    base_em = exact_match(_disabled(model), tokenizer, val_rows, cfg.max_new_tokens, check=check)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    data = _encode(tokenizer, train_rows)
    order: list[int] = []
    started, step, val_em, loss_avg = time.time(), 0, 0.0, float("nan")
    while step < cfg.max_steps:
        model.train()
        if len(order) < cfg.batch_size:
            order += rng.sample(range(len(data)), len(data))
        batch = _collate([data[i] for i in order[: cfg.batch_size]], tokenizer.pad_token_id)
        del order[: cfg.batch_size]
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, cfg)
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        loss_avg = loss.item() if math.isnan(loss_avg) else 0.9 * loss_avg + 0.1 * loss.item()
        if step % 10 == 0:
            log(f"{name} step {step} loss {loss_avg:.4f} ({time.time() - started:.0f}s)")
        if cfg.eval_every and step >= cfg.min_steps and (step % cfg.eval_every == 0 or step == cfg.max_steps):
            val_em = exact_match(model, tokenizer, val_rows, cfg.max_new_tokens, check=check)
            log(f"{name} step {step} validation exact match {val_em:.3f}")
            if val_em >= cfg.target_em:
                break
    with torch.no_grad():  # score exactly what ships: float16 factors
        for p in params:
            p.copy_(p.to(torch.float16).to(p.dtype))
    adapter_em = exact_match(model, tokenizer, val_rows, cfg.max_new_tokens, check=check)
    out_dir = out_root / (out_name or name)
    _save_float16(model, out_dir)
    model.unload()  # strips the LoRA layers in place: `base` is clean for the next task
    entry = {"task": name, "steps": step, "batch_size": cfg.batch_size, "lr": cfg.lr, "seconds": round(time.time() - started, 1),
             "final_loss": round(loss_avg, 4), "n_train": len(train_rows), "n_val": len(val_rows),
             "base_em": round(base_em, 4), "adapter_em": round(adapter_em, 4)}
    log(f"{name} done: {entry}")
    return entry


class _disabled:
    """A view of a PEFT model that generates with every adapter disabled."""

    def __init__(self, model) -> None:
        self.model = model

    def eval(self) -> "_disabled":
        self.model.eval()
        return self

    def generate(self, **kwargs):
        with self.model.disable_adapter():
            return self.model.generate(**kwargs)


def load_base(dtype: torch.dtype = torch.float32):
    """The demo model and its tokenizer (pad token set), from the converted cache copy."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    path = ensure_demo_model()
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval(), tokenizer


def _merge_report(path: Path, entries: list[dict], cfg: TrainConfig, splits, names: tuple[str, ...] = TASK_NAMES,
                  command: str = "python -m jobs.demo.train --task all") -> None:
    report = json.loads(path.read_text()) if path.is_file() else {"tasks": {}}
    report["tasks"].update({e["task"]: e for e in entries})
    report["tasks"] = {k: v for k, v in sorted(report["tasks"].items()) if k in names}
    report.update({"base_model": BASE_MODEL_ID, "train_config": asdict(cfg),
                   "split_config": asdict(splits), "machine": platform.platform(),
                   "metric": "exact match on the validation split, greedy, first line",
                   "command": command})
    path.write_text(json.dumps(report, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=("demo", "bigbench"), default="demo",
                        help="`demo`: the generated tasks; `bigbench`: BIG-bench tasks (jobs.demo.bigbench)")
    parser.add_argument("--task", default="all", help="'all' (the suite's pool) or comma-separated task names")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"pool directory (default {ADAPTER_DIR} or, for bigbench, {BIGBENCH_ADAPTER_DIR})")
    parser.add_argument("--max-steps", type=int, default=None, help="optimiser steps (default: the suite's)")
    args = parser.parse_args(argv)
    if args.suite == "bigbench":
        return _main_bigbench(args)
    names = list(TASK_NAMES) if args.task == "all" else args.task.split(",")
    cfg, splits = TrainConfig(max_steps=args.max_steps or TrainConfig.max_steps), SplitConfig()
    args.out = args.out or ADAPTER_DIR
    torch.set_num_threads(cfg.threads)
    base, tokenizer = load_base()
    args.out.mkdir(parents=True, exist_ok=True)
    for name in names:
        entry = train_task(name, base, tokenizer, cfg, splits, args.out,
                           log=lambda m: print(m, flush=True))
        _merge_report(args.out / REPORT_NAME, [entry], cfg, splits)
    return 0


def _main_bigbench(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from jobs.demo import bigbench

    names = list(bigbench.POOL_TASKS) if args.task == "all" else args.task.split(",")
    steps = args.max_steps or BIGBENCH_TRAIN.max_steps
    cfg = replace(BIGBENCH_TRAIN, max_steps=steps, min_steps=steps)
    splits = bigbench.SplitConfig()
    out = args.out or BIGBENCH_ADAPTER_DIR
    torch.set_num_threads(cfg.threads)
    data = bigbench.task_splits(names, splits)  # one pass over the archive for every task
    base, tokenizer = load_base()
    out.mkdir(parents=True, exist_ok=True)
    command = "python -m jobs.demo.train --suite bigbench --task all"
    for name in names:
        entry = train_task(name, base, tokenizer, cfg, splits, out, log=lambda m: print(m, flush=True),
                           rows=(data[name]["train"], data[name]["validation"]), check=bigbench.check_row,
                           out_name=bigbench.adapter_name(name))
        _merge_report(out / REPORT_NAME, [entry], cfg, splits, tuple(names) + tuple(bigbench.POOL_TASKS), command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
