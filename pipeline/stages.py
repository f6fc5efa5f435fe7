"""The LoGo stage: the callable class Ray Data runs in each actor (no Ray import needed here).

Input schema (from `inputs.read_unit`): `id`, the prompt column, pass-through columns,
`inputs.INPUT_ERROR` and `inputs.INTERNAL_COLUMNS`. Output schema: `outputs.OUTPUT_FIELDS`, the
pass-through columns, then the internal columns unchanged (the write stage records and drops them).

On start an actor makes the model and the adapter pool local (an s3://
URI is downloaded once per node into the cache and verified, see `fetch`), then builds one
`actors.LoGoPredictor`; a bad option, model or adapter raises there, before any row is seen.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa

from pipeline import fetch
from pipeline.config import JobConfig
from pipeline.inputs import INPUT_ERROR, INTERNAL_COLUMNS
from pipeline.outputs import BATCHING_COLUMN, OUTPUT_FIELDS


def predictor_from_config(config: JobConfig, calibration: dict | None = None, pins: dict | None = None):
    """An `actors.LoGoPredictor` for this job, with remote model and adapters made local first.

    `calibration` is the run's statistics (computed once, before any actor starts, and pinned in
    `_job.json`), so every actor routes with the same numbers. `pins` is `_job.json`'s `contents`:
    a local model or pool is checked against them at every read of a file (`actors.fingerprint`),
    an s3:// one is copied only from a bucket listing equal to them (`fetch.local_copy`).
    """
    from actors import LoGoPredictor

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    options = config.predictor_options()
    if calibration is not None:
        options["calibration"] = calibration
    model, adapters, actor_pins = fetch.pinned_sources(config.model.path, config.adapters.path, config.storage, pins)
    if actor_pins is not None:
        options["pins"] = actor_pins
    options["index_cache"] = fetch.cache_root(config.storage)  # the routing index, built once per node
    return LoGoPredictor(model=model, adapters=adapters, **options)


def _objects(column: pa.ChunkedArray) -> np.ndarray:
    values = column.to_pylist()
    out = np.empty(len(values), dtype=object)
    for i, value in enumerate(values):
        out[i] = value
    return out


class LoGoStage:
    """Routes and generates for a batch of input rows; returns them in the output schema."""

    def __init__(self, config: JobConfig, calibration: dict | None = None, pins: dict | None = None,
                 counter=None):
        """`counter`: a handle of the driver's row counter (`dataflow.RowCounter`), told as rows are done."""
        self.config = config
        self.predictor = predictor_from_config(config, calibration, pins)
        if counter is not None:
            self.predictor.on_rows = lambda rows: counter.add.remote(rows)  # fire and forget

    def __call__(self, table: pa.Table) -> pa.Table:
        prompt_column = self.config.input.prompt_column
        before = self.predictor.batching()
        result = self.predictor({prompt_column: _objects(table.column(prompt_column))})
        after = self.predictor.batching()
        batching = {k: (v if k.startswith("peak") else round(v - before[k], 6)) for k, v in after.items()}
        errors = list(result["error"])
        for row, message in enumerate(table.column(INPUT_ERROR).to_pylist()):
            if message is not None:  # the file's prompt column is not text: say that, not "null"
                errors[row] = message
        fields = {f.name: f.type for f in OUTPUT_FIELDS}
        columns = {
            "id": table.column("id"),
            "output": pa.array(list(result["output"]), fields["output"]),
            "adapters": pa.array([[str(a) for a in names] for names in result["adapters"]], fields["adapters"]),
            "weights": pa.array([[float(w) for w in ws] for ws in result["weights"]], fields["weights"]),
            "confidence": pa.array([float(c) if c is not None and math.isfinite(c) else None
                                    for c in result["confidence"]], fields["confidence"]),
            "error": pa.array(errors, fields["error"]),
            "warning": pa.array(list(result["warning"]), fields["warning"]),
            "prompt_tokens": pa.array([int(v) for v in result["prompt_tokens"]], fields["prompt_tokens"]),
            "output_tokens": pa.array([int(v) for v in result["output_tokens"]], fields["output_tokens"]),
        }
        for name in self.config.input.passthrough:
            columns[name] = table.column(name)
        for name in INTERNAL_COLUMNS:
            if name in table.column_names:
                columns[name] = table.column(name)
        columns[BATCHING_COLUMN] = pa.array([json.dumps(batching)] + [None] * (table.num_rows - 1), pa.string())
        return pa.table(columns)
