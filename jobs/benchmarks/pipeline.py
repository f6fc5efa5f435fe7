"""The pipeline benchmark (`logo-batch bench --pipeline`): the driver and the reads as the input grows.

For each input size and row-group size (generated Parquet, local and, with an S3 endpoint, on
S3), one `run_job` in a fresh driver process, reporting the driver's peak memory, the time to
the first output file, rows/s and the rows decoded; beside it the same tiny model's in-process
`LoGoPredictor` rows/s on the same machine (one thread, as the one actor has one CPU). Then
`validate_job` on inputs up to `validate_rows` (10M by default) for planning time and driver
memory, again each in a fresh process.

    python -m jobs.benchmarks.pipeline case '<json>'   # one measurement in this process (internal)
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

K, NEW_TOKENS, ADAPTERS = 2, 1, 4


@dataclass(frozen=True)
class PipelineBench:
    rows: tuple[int, ...] = (100_000,)
    """Input sizes run through the pipeline."""
    row_groups: tuple[int, ...] = (1_000_000, 10_000)
    """Parquet row-group sizes (rows) of the generated inputs."""
    validate_rows: tuple[int, ...] = (100_000, 10_000_000)
    """Input sizes planned by `validate` (row groups of 1M rows)."""
    batch_size: int = 256
    """Rows per actor call (and per in-process predictor call)."""
    baseline_rows: int = 8192
    """Prompts timed through the in-process predictor."""
    s3_endpoint: str | None = None
    """S3 endpoint (e.g. SeaweedFS) to repeat every pipeline case with input and output on S3."""
    s3_bucket: str = "logo-batch-bench"
    """Bucket for the S3 cases (created if absent)."""


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss, not inherited from the parent)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def tiny_assets(root: Path) -> tuple[Path, Path]:
    """The throughput benchmark's tiny Llama (saved with its tokenizer) and four PEFT adapters."""
    from jobs.benchmarks.config import TINY
    from jobs.benchmarks.models import random_model, synthetic_pool, word_tokenizer

    model_dir, pool_dir = root / "model", root / "adapters"
    if not (model_dir / "config.json").exists():
        model = random_model(TINY, seed=0)
        model.save_pretrained(model_dir)
        word_tokenizer(TINY.vocab).save_pretrained(model_dir)
        synthetic_pool(model, TINY, ADAPTERS, seed=1, root=pool_dir)
    return model_dir, pool_dir


def write_input(path: Path, rows: int, row_group: int, seed: int = 0) -> Path:
    """`rows` prompts of 8-24 words (from 4096 distinct ones), written in chunks with `row_group` rows
    per Parquet row group."""
    if path.exists():
        return path
    from jobs.benchmarks.config import TINY

    rng = np.random.default_rng(seed)
    distinct = pa.array([" ".join(f"t{w}" for w in rng.integers(4, TINY.vocab, rng.integers(8, 25)))
                         for _ in range(4096)], pa.string())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with pq.ParquetWriter(tmp, pa.schema([("prompt", pa.string())])) as writer:
        for start in range(0, rows, row_group):
            n = min(row_group, rows - start)
            picks = pa.array(rng.integers(0, len(distinct), n), pa.int32())
            writer.write_table(pa.table({"prompt": distinct.take(picks)}), row_group_size=row_group)
    tmp.rename(path)
    return path


def job_config(model: Path | str, pool: Path | str, input_uri: str, output_uri: str, batch_size: int,
               endpoint: str | None = None):
    from pipeline import config_from_dict

    return config_from_dict({
        "model": {"path": str(model)}, "adapters": {"path": str(pool)}, "input": {"uri": input_uri},
        "output": {"uri": output_uri, "overwrite": True}, "routing": {"k": K},
        "generation": {"max_new_tokens": NEW_TOKENS}, "resources": {"actors": 1, "batch_size": batch_size},
        "storage": {"endpoint": endpoint, "cache_dir": str(Path(output_uri).parent / "cache") if endpoint is None
                    else None},
    })


def case(spec: dict) -> dict:
    """One measurement in this (fresh) process: `run` or `validate` a job; the process's peak memory."""
    from pipeline import run_job
    from pipeline.config_io import config_from_dict

    config = config_from_dict(spec["config"])
    started = time.perf_counter()
    if spec["kind"] == "validate":
        from pipeline.validate import validate_job

        result = validate_job(config)
        return {"plan_seconds": round(result.plan_seconds, 3), "problems": result.problems,
                "seconds": round(time.perf_counter() - started, 3), "driver_peak_mb": round(peak_rss_mb(), 1),
                "slices": result.plan.slices if result.plan else None}
    report = run_job(config, progress=False)
    from pipeline import outputs, storage

    manifest = outputs.read_json(storage.join(config.output.uri, outputs.MANIFEST), config.storage)
    timings = manifest["timings"]
    return {"rows": report.rows_computed, "seconds": round(time.perf_counter() - started, 3),
            "dataflow_seconds": timings.get("dataflow_seconds"), "plan_seconds": timings.get("plan_seconds"),
            "first_file_seconds": timings.get("first_file_seconds"), "rows_decoded": report.rows_decoded,
            "rows_per_second": round(report.rows_computed / timings["dataflow_seconds"], 1),
            "steady_rows_per_second": _steady(report.rows_computed, manifest, timings),
            "files": len(manifest["output"]["files"]), "driver_peak_mb": round(peak_rss_mb(), 1)}


def _steady(rows: int, manifest: dict, timings: dict) -> float | None:
    """Rows/s after the first data file (actor start-up excluded): rows of the later files over the
    time from the first file to the end."""
    first, total = timings.get("first_file_seconds"), timings.get("dataflow_seconds")
    files = manifest["output"]["files"]
    if first is None or len(files) < 2 or total <= first:
        return None
    return round((rows - min(f["rows"] for f in files)) / (total - first), 1)


def in_subprocess(kind: str, config, log) -> dict:
    from pipeline.config_io import config_to_dict

    spec = json.dumps({"kind": kind, "config": config_to_dict(config)})
    done = subprocess.run([sys.executable, "-m", "jobs.benchmarks.pipeline", "case", spec], capture_output=True,
                          text=True, env={**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")})
    if done.returncode != 0:
        log(done.stderr[-3000:])
        raise RuntimeError(f"the {kind} case failed (exit {done.returncode})")
    return json.loads(done.stdout.strip().splitlines()[-1])


def predictor_rows_per_second(model: Path, pool: Path, path: Path, rows: int, batch_size: int) -> float:
    """The same model's in-process `LoGoPredictor`, one thread, on the first `rows` prompts."""
    import torch

    from actors import LoGoPredictor

    torch.set_num_threads(1)
    prompts = pq.read_table(path).column("prompt").slice(0, rows).to_numpy(zero_copy_only=False)
    predictor = LoGoPredictor(model=str(model), adapters=str(pool), k=K, max_new_tokens=NEW_TOKENS)
    predictor({"prompt": prompts[:batch_size]})  # warm up
    started = time.perf_counter()
    for start in range(0, len(prompts), batch_size):
        predictor({"prompt": prompts[start:start + batch_size]})
    return len(prompts) / (time.perf_counter() - started)


def upload(path: Path, endpoint: str, bucket: str, key: str) -> str:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, region_name=os.environ.get("AWS_REGION", "us-east-1"))
    try:
        client.create_bucket(Bucket=bucket)
    except client.exceptions.ClientError:  # exists
        pass
    client.upload_file(str(path), bucket, key)
    return f"s3://{bucket}/{key}"


def run(cfg: PipelineBench, root: Path, log) -> dict:
    model, pool = tiny_assets(root / "assets")
    cases = []
    baselines = []
    for rows in cfg.rows:
        for group in cfg.row_groups:
            path = write_input(root / "inputs" / f"rows{rows}-rg{group}" / "prompts.parquet", rows, min(group, rows))
            places = [("local", str(path.parent), str(root / "runs" / path.parent.name), None)]
            if cfg.s3_endpoint:
                uri = upload(path, cfg.s3_endpoint, cfg.s3_bucket, f"inputs/{path.parent.name}/prompts.parquet")
                places.append(("s3", uri.rsplit("/", 1)[0], f"s3://{cfg.s3_bucket}/runs/{path.parent.name}",
                               cfg.s3_endpoint))
            for where, input_uri, output_uri, endpoint in places:
                # the baseline right before each case: the machine's load changes over a run
                baseline = predictor_rows_per_second(model, pool, path, min(cfg.baseline_rows, rows), cfg.batch_size)
                baselines.append(baseline)
                log(f"run: {rows:,} rows, row groups of {min(group, rows):,}, {where}; "
                    f"in-process predictor {baseline:,.0f} rows/s")
                config = job_config(model, pool, input_uri, output_uri, cfg.batch_size, endpoint)
                result = in_subprocess("run", config, log)
                steady = result["steady_rows_per_second"]
                result.update(rows_in=rows, row_group=min(group, rows), storage=where,
                              predictor_rows_per_second=round(baseline, 1),
                              vs_predictor=round(result["rows_per_second"] / baseline, 3),
                              steady_vs_predictor=None if steady is None else round(steady / baseline, 3))
                log(f"  {result}")
                cases.append(result)
    planned = []
    for rows in cfg.validate_rows:
        path = write_input(root / "inputs" / f"rows{rows}-rg1000000" / "prompts.parquet", rows, min(rows, 1_000_000))
        config = job_config(model, pool, str(path.parent), str(root / "runs" / f"validate-{rows}"), cfg.batch_size)
        log(f"validate: {rows:,} rows")
        result = in_subprocess("validate", config, log)
        result.update(rows_in=rows)
        log(f"  {result}")
        planned.append(result)
    growth = planned[-1]["driver_peak_mb"] - planned[0]["driver_peak_mb"] if len(planned) > 1 else None
    return {"bench": asdict(cfg), "predictor_rows_per_second": round(float(np.median(baselines)), 1) if baselines
            else None, "runs": cases,
            "validate": planned, "validate_memory_growth_mb": growth}


def table(report: dict) -> str:
    lines = ["| rows | row group | storage | predictor rows/s | rows/s | vs predictor | steady rows/s | steady vs predictor | first file s "
             "| plan s | decoded/rows | files | driver peak MB |", "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["runs"]:
        lines.append(f"| {r['rows_in']:,} | {r['row_group']:,} | {r['storage']} | {r['predictor_rows_per_second']:,.0f} | "
                     f"{r['rows_per_second']:,.0f} | "
                     f"{r['vs_predictor']:.2f} | {r['steady_rows_per_second']} | {r['steady_vs_predictor']} | "
                     f"{r['first_file_seconds']} | {r['plan_seconds']} | {r['rows_decoded'] / max(1, r['rows']):.2f} | "
                     f"{r['files']} | {r['driver_peak_mb']:.0f} |")
    lines += ["", "| validate rows | plan s | total s | slices | driver peak MB |", "|---:|---:|---:|---:|---:|"]
    for v in report["validate"]:
        lines.append(f"| {v['rows_in']:,} | {v['plan_seconds']} | {v['seconds']} | {v['slices']} | "
                     f"{v['driver_peak_mb']:.0f} |")
    if report["validate_memory_growth_mb"] is not None:
        lines.append(f"driver peak memory growth, smallest to largest validate: {report['validate_memory_growth_mb']:.0f} MB")
    return "\n".join(lines)


if __name__ == "__main__" and sys.argv[1:2] == ["case"]:
    print(json.dumps(case(json.loads(sys.argv[2]))))
