"""`validate_job(config) -> Validation`: every check a run makes before its first actor, collected.

    output      committed already? another job's? a partial run of this job (what is written)?
    input       files, columns and types (one type per column across files), row counts and row
                groups, null and duplicate ids; rows a non-text prompt column makes error rows,
                a problem only when they exceed run.max_error_fraction (the run would exit 3)
    prompts     token lengths of a sample; blank and over-long prompts counted in it
    model       config and tokenizer load; the context leaves room for max_new_tokens
    adapters    every adapter reads and fits the model (on the meta device: no weights allocated); a
                bytes max_resident holds the k largest (`bounds.check_residency`, as run checks it)
    plan        read tasks and slices for the rows still to do, from the Parquet footers

Nothing is written and no actor starts (a duplicate-id check on a configured id column runs as
Ray tasks). Every problem found is listed, not only the first.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow.parquet as pq

from pipeline import commit, fetch, guards, inputs, outputs, storage
from pipeline.calibration import check_statistics
from pipeline.config import CALIBRATION_SOURCES, ConfigError, JobConfig
from pipeline.errors import TooManyErrors
from pipeline.placement import placed
from pipeline.runner import Plan, check_ids, check_sources, plan

SAMPLE_ROWS = 1024
"""Prompts sampled for the length statistics: the first rows of up to `SAMPLE_GROUPS` row groups."""
SAMPLE_GROUPS = 16
"""Row groups the sample is drawn from, spread evenly over the input."""


@dataclass
class Validation:
    """What `validate_job` found."""

    problems: list[str] = field(default_factory=list)
    """Everything that would stop the job, each naming the file, key or adapter and the fix."""
    lines: list[str] = field(default_factory=list)
    """What was checked, and the plan, for the user to read."""
    plan: Plan | None = None
    """The plan (None when the input could not be read)."""
    plan_seconds: float = 0.0
    """Seconds to list the input, read its footers and plan the reads."""

    def format(self) -> str:
        out = list(self.lines)
        if self.problems:
            problems = list(dict.fromkeys(self.problems))  # one refused request can fail several checks alike
            credentials = [p for p in problems if "no S3 credentials found" in p]
            if credentials:  # said once; a request refused without them follows from it
                problems = [p for p in problems if p == credentials[0] or
                            (p not in credentials and "refused the request" not in p)]
            out.append(f"{len(problems)} problem(s):")
            out += [f"  - {p}" for p in problems]
        else:
            out.append("no problems found")
        return "\n".join(out)


@contextlib.contextmanager
def _collect(result: Validation, *kinds: type[BaseException]):
    try:
        yield
    except kinds as err:
        result.problems.append(str(err))


def validate_job(config: JobConfig, sample_rows: int = SAMPLE_ROWS) -> Validation:
    """Check the job as `run_job` would before starting actors, without writing anything."""
    result = Validation()
    config = placed(config)  # as `run_job` does: the hash sees the dtype and device the actors use
    with _collect(result, commit.OutputError, ConfigError):
        if commit.committed_manifest(config) is not None:
            result.lines.append(f"output: {config.output.uri} is committed; a run would do nothing")
    refused = bool(result.problems)  # a run would refuse the output as it is: a plan would contradict that
    t0 = time.perf_counter()
    files = None
    with _collect(result, inputs.InputError, ConfigError):
        files = inputs.discover(config.input, config.storage)
    if files is not None:
        groups = sum(len(f.row_groups) for f in files)
        result.lines.append(f"input: {len(files)} Parquet files, {inputs.total_rows(files):,} rows, {groups} row groups")
        with _collect(result, TooManyErrors):  # what `run_job` refuses before any work
            line = guards.check_prompt_types(files, config.input, config.run.max_error_fraction)
            result.lines += [f"prompts: {line}"] if line else []
        with _collect(result, inputs.InputError, commit.OutputError):
            _check_partial(config, files)
            if not refused:
                result.plan = plan(config, files, repair=False)
                result.plan_seconds = time.perf_counter() - t0
                result.lines.append(f"plan ({result.plan_seconds:.2f} s): {result.plan.describe()}")
                result.lines += _plan_table(result.plan)
        with _collect(result, inputs.InputError):
            check_ids(config, files)
    with _collect(result, ConfigError):
        check_sources(config)
        _check_calibration_file(config)
    limit = None
    with _collect(result, Exception):
        limit = _check_model_and_adapters(config, result)
    if files is not None:
        with _collect(result, Exception):
            result.lines.append(_prompt_statistics(config, files, limit, sample_rows))
    return result


def _check_partial(config: JobConfig, files: list[inputs.InputFile]) -> None:
    """A partial run at the output must be this job, with its pinned statistics (read-only
    `commit.open_run`)."""
    theirs = outputs.read_json(storage.join(config.output.uri, outputs.JOB_RECORD), config.storage)
    if theirs is not None and storage.read_bytes(storage.join(config.output.uri, outputs.SUCCESS),
                                                 config.storage) is None:
        commit._same_job(commit.job_record(config, files), theirs, f"the partial run at {config.output.uri}")
        commit._pinned_statistics(storage.join(config.output.uri, outputs.CALIBRATION), theirs, config.storage)


def _check_calibration_file(config: JobConfig) -> None:
    """A statistics file given as routing.calibration fits the pool (as a run checks it before storing)."""
    if config.routing.calibration in (None, *CALIBRATION_SOURCES):
        return
    from pipeline.calibration import job_statistics

    check_statistics(job_statistics(config), config)


def _plan_table(work: Plan, limit: int = 20) -> list[str]:
    per_file: dict[int, list[inputs.ReadUnit]] = {}
    for unit in work.units:
        per_file.setdefault(unit.index, []).append(unit)
    lines = ["  file  rows  row-groups  to-do  read-tasks  slices"]
    for index, f in enumerate(work.files[:limit]):
        units = per_file.get(index, [])
        lines.append(f"  {f.name}  {f.rows:,}  {len(f.row_groups)}  {sum(u.rows for u in units):,}  {len(units)}  "
                     f"{sum(len(u.slices) for u in units)}")
    if len(work.files) > limit:
        lines.append(f"  ... and {len(work.files) - limit} more files")
    return lines


def _check_model_and_adapters(config: JobConfig, result: Validation) -> int:
    """Load the model's config and tokenizer, build it on the meta device, and check every adapter
    against it; returns the longest prompt in tokens."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from actors.adapters import AdapterError, read_adapter, resolve_sources, validate_adapter
    from actors.base import context_length

    hf_logging.disable_progress_bar()
    model_dir = fetch.local_copy(config.model.path, config.storage)
    try:
        model_config = AutoConfig.from_pretrained(model_dir)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except Exception as err:
        raise ValueError(f"model.path {config.model.path!r}: cannot load its config and tokenizer ({err}); give a "
                         "Hugging Face model directory (config.json, *.safetensors, tokenizer files)") from None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
    layers = int(getattr(model_config, "num_hidden_layers", 0))
    probe = config.routing.probe_layers
    asked = () if probe == "all" else (probe,) if isinstance(probe, int) else tuple(probe)
    out_of_range = [b for b in asked if not -layers <= b < layers]
    if layers and out_of_range:
        result.problems.append(f"routing.probe_layers: block {out_of_range[0]} is out of range for a model with "
                               f"{layers} blocks; use -{layers}..{layers - 1} or all")
    room = context_length(model) - config.generation.max_new_tokens
    if room < 1:
        result.problems.append(f"generation.max_new_tokens: {config.generation.max_new_tokens} leaves no room for "
                               f"a prompt in the model's context of {context_length(model)} tokens")
    result.lines.append(f"model: {type(model).__name__}, {layers} blocks, context {context_length(model)} tokens")
    try:
        sources = resolve_sources(fetch.local_copy(config.adapters.path, config.storage))
    except AdapterError as err:
        result.problems.append(f"adapters.path: {err}")
        return max(room, 1)
    bad = 0
    for name, path in sources.items():
        try:
            validate_adapter(read_adapter(name, path), model)
        except AdapterError as err:
            result.problems.append(str(err))
            bad += 1
    result.lines.append(f"adapters: {len(sources)} checked, {bad} refused")
    if config.routing.k > len(sources):
        result.lines.append(f"  routing.k {config.routing.k} is more than the pool's {len(sources)}: all are mixed")
    return max(1, min(room, config.generation.max_prompt_tokens or room))


def sample_prompts(config: JobConfig, files: list[inputs.InputFile], rows: int) -> list[str | None]:
    """The first rows of up to SAMPLE_GROUPS row groups spread evenly over the input (a cheap sample:
    a few row groups are read, whatever the input's size); a prompt that is not text is None."""
    groups = [(f, g) for f in files for g in range(len(f.row_groups))]
    picks = sorted({int(i) for i in np.linspace(0, len(groups) - 1, min(SAMPLE_GROUPS, len(groups)))})
    per_group = -(-rows // max(1, len(picks)))
    chunks = []
    for i in picks:
        f, g = groups[i]
        fs, path = storage.filesystem(f.uri, config.storage)
        with fs.open_input_file(path) as handle:
            batches = pq.ParquetFile(handle).iter_batches(batch_size=per_group, row_groups=[g],
                                                          columns=[config.input.prompt_column])
            first = next(batches, None)
            if first is not None:
                column = first.column(0)
                chunks += column.to_pylist() if inputs._is_string(column.type) else [None] * len(column)
    return chunks


def _prompt_statistics(config: JobConfig, files: list[inputs.InputFile], limit: int | None, rows: int) -> str:
    from transformers import AutoTokenizer

    values = sample_prompts(config, files, rows)
    texts = [v for v in values if isinstance(v, str) and v.strip()]
    blank = len(values) - len(texts)
    line = f"prompts: sampled {len(values)}; blank (or not text) {blank}"
    if limit is None or not texts:
        return line
    tokenizer = AutoTokenizer.from_pretrained(fetch.local_copy(config.model.path, config.storage))
    lengths = np.array([len(ids) for ids in tokenizer(texts)["input_ids"]])
    over = int((lengths > limit).sum())
    action = "truncated with a warning" if config.generation.overlong == "truncate" else "error rows"
    p50, p95 = np.percentile(lengths, [50, 95])
    return (f"{line}; over-long (> {limit} tokens) {over} ({action}); tokens min {lengths.min()}, median {p50:.0f}, "
            f"p95 {p95:.0f}, max {lengths.max()}")
