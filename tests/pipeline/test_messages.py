"""What `logo-batch validate` and `logo-batch run` say, and agree on, for mistakes that used to end
in a traceback: an id column of two types, refused S3 credentials or a missing bucket, a bytes
`max_resident` below the k largest adapters, a prompt column that is not text."""

from __future__ import annotations

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from actors.residency import format_bytes
from jobs.cli import main
from tests.pipeline.conftest import write_prompts

NO_RAY = ["--gpus-per-actor", "0"]  # `auto` placement decided by the configuration: no cluster asked


def _args(command, model, pool, input_uri, output_uri, *extra):
    return [command, "--model", str(model), "--adapters", str(pool), "--input", str(input_uri), "--output",
            str(output_uri), "--max-new-tokens", "2", *NO_RAY, *extra]


def _one_line(err: str, command: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith(f"logo-batch {command}")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_id_column_of_two_types_is_one_line_naming_both_files(tiny_assets, tmp_path, capsys):
    model, pool = tiny_assets
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"prompt": ["a", "b"], "key": [1, 2]}), tmp_path / "in" / "a.parquet")
    pq.write_table(pa.table({"prompt": ["c"], "key": ["k3"]}), tmp_path / "in" / "b.parquet")
    expected = (f"id column 'key' (input.id_column) has type int64 in {tmp_path / 'in' / 'a.parquet'} but string in "
                f"{tmp_path / 'in' / 'b.parquet'}; give it one type in every file")
    args = _args("run", model, pool, tmp_path / "in", tmp_path / "out", "--id-column", "key")
    assert main(args) == 2
    assert expected in _one_line(capsys.readouterr().err, "run")
    assert not (tmp_path / "out").exists()
    assert main(["validate", *args[1:]]) == 2
    out = capsys.readouterr().out
    assert "1 problem(s):" in out and expected in out


@pytest.fixture()
def fresh_credentials(monkeypatch):
    """boto3 reads credentials once per process (its default session): start a new one, as a new
    `logo-batch` process would, after the test changes the environment."""
    monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)
    for name, value in (("AWS_EC2_METADATA_DISABLED", "true"), ("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent"),
                        ("AWS_CONFIG_FILE", "/nonexistent")):
        monkeypatch.setenv(name, value)
    return monkeypatch


@pytest.mark.parametrize("case", ["wrong secret", "unknown key", "no credentials"])
def test_refused_s3_credentials_are_one_line_naming_the_uri_variables_and_endpoint(
        case, s3_server, tiny_assets, tmp_path, capsys, fresh_credentials):
    model, pool = tiny_assets
    write_prompts(tmp_path / "in", (4,))
    inp = s3_server.upload_dir(tmp_path / "in", f"creds-{case.replace(' ', '-')}/in")
    if case == "wrong secret":
        fresh_credentials.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    elif case == "unknown key":
        fresh_credentials.setenv("AWS_ACCESS_KEY_ID", "nobody")
    else:
        fresh_credentials.delenv("AWS_ACCESS_KEY_ID")
        fresh_credentials.delenv("AWS_SECRET_ACCESS_KEY")
    fresh_credentials.setattr(boto3, "DEFAULT_SESSION", None)  # the upload above made one
    code = {"wrong secret": "SignatureDoesNotMatch", "unknown key": "InvalidAccessKeyId",
            "no credentials": "no S3 credentials found"}[case]
    s3_out = f"s3://{s3_server.bucket}/creds/out"
    # S3 output: the first request is boto3's (is the output committed?); local output: pyarrow's listing of
    # the input (a HEAD request, whose refusal has no body to say why: AccessDenied)
    for output, first in ((s3_out, f"{s3_out}/_SUCCESS"), (tmp_path / "out", inp)):
        args = _args("run", model, pool, inp, output, "--endpoint", s3_server.endpoint)
        assert main(args) == 2
        line = _one_line(capsys.readouterr().err, "run")
        assert line.startswith(f"logo-batch run: {first}: ") and (code in line or "AccessDenied" in line), line
        if case != "no credentials":  # anonymous requests to this server are refused as AccessDenied
            assert "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in line and "storage.endpoint" in line, line
            assert s3_server.endpoint in line
        else:
            assert "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in line or "AccessDenied" in line, line
    assert main(["validate", *args[1:]]) == 2
    out = capsys.readouterr().out
    assert f"{inp}: " in out and "Traceback" not in out


def test_missing_bucket_is_one_line(s3_server, tiny_assets, tmp_path, capsys):
    model, pool = tiny_assets
    write_prompts(tmp_path / "in", (4,))
    args = _args("run", model, pool, tmp_path / "in", "s3://no-such-bucket/out", "--endpoint", s3_server.endpoint)
    assert main(args) == 2
    line = _one_line(capsys.readouterr().err, "run")
    assert (f"s3://no-such-bucket/out/_SUCCESS: the S3 service at {s3_server.endpoint} (storage.endpoint) has no "
            "bucket 'no-such-bucket'; check the URI and storage.endpoint") in line


def test_sizes_print_in_a_unit_that_fits():
    assert [format_bytes(n) for n in (512, 1024, 1536, 3 * 2**20, 20 * 2**30, 2**41)] == \
        ["512 B", "1.0 KiB", "1.5 KiB", "3.0 MiB", "20.0 GiB", "2.0 TiB"]


def test_bytes_bound_below_the_k_largest_adapters_is_refused_alike_by_validate_and_run(tiny_assets, tmp_path,
                                                                                       capsys):
    import torch

    from actors import AdapterPool
    from actors.base import load_base
    from pipeline import load_config
    from pipeline.bounds import slot_size
    from pipeline.placement import resolve_placement

    model, pool = tiny_assets
    write_prompts(tmp_path / "in", (4,))
    for dtype, torch_dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        config = load_config(None, {"model.path": str(model), "model.dtype": dtype, "adapters.path": str(pool),
                                    "input.uri": "i", "output.uri": "o"})
        base, _ = load_base(model, torch_dtype, torch.device("cpu"))
        loaded = AdapterPool.load(pool, base, dtype=torch_dtype, max_resident="1MiB")
        assert slot_size(config) == (loaded.slot_nbytes, len(loaded)), "the driver's slot is the actor's"
    config = resolve_placement(load_config(None, {"model.path": str(model), "adapters.path": str(pool),
                                                  "input.uri": "i", "output.uri": "o"}), lambda: 0)
    assert config.model.dtype == "float32"
    slot, _ = slot_size(config)
    expected = (f"adapters.max_resident=1.0 KiB holds {1024 // slot} adapter slots of {format_bytes(slot)} (every "
                f"adapted module at the pool's largest rank there), fewer than one prompt's k=2 adapters; raise it "
                f"to at least {format_bytes(2 * slot)}")
    assert format_bytes(2 * slot).endswith("KiB")
    args = _args("run", model, pool, tmp_path / "in", tmp_path / "out", "--k", "2",
                 "--set", "adapters.max_resident=1KiB")
    assert main(["validate", *args[1:]]) == 2
    out = capsys.readouterr().out
    assert "1 problem(s):" in out and expected in out
    assert main(args) == 2
    assert expected in _one_line(capsys.readouterr().err, "run")
    assert not (tmp_path / "out").exists()  # refused before any work
    roomy = [a if a != "adapters.max_resident=1KiB" else f"adapters.max_resident={2 * slot}B" for a in args]
    assert main(["validate", *roomy[1:]]) == 0, "exactly k slots fit"
    capsys.readouterr()


def test_prompt_column_not_text_validate_reports_a_problem_exactly_when_run_exits_3(ray_runtime, tiny_assets,
                                                                                   tmp_path, capsys):
    model, pool = tiny_assets
    write_prompts(tmp_path / "in", (40,))
    pq.write_table(pa.table({"prompt": pa.array([b"\x00raw", b"bytes"], pa.binary()), "task": ["t", "t"],
                             "key": ["b0", "b1"]}), tmp_path / "in" / "raw.parquet")
    args = _args("run", model, pool, tmp_path / "in", tmp_path / "out", "--actors", "1", "--batch-size", "8")
    what = (f"{tmp_path / 'in' / 'raw.parquet'}: prompt column 'prompt' has type binary, not string; "
            "its rows (2 of 42, 4.8%)")
    assert main(["validate", *args[1:]]) == 2  # 2 of 42 rows > the default 0.01
    out = capsys.readouterr().out
    assert f"{what} would be error rows, more than run.max_error_fraction=0.01" in out and "1 problem(s):" in out
    assert main(args) == 3
    assert "2 of 42 rows (4.8%) have an error, more than run.max_error_fraction=0.01" in capsys.readouterr().err
    accept = ["--set", "run.max_error_fraction=0.05"]
    assert main(["validate", *args[1:], *accept]) == 0
    out = capsys.readouterr().out
    assert f"prompts: {what} will be error rows (within run.max_error_fraction=0.05)" in out
    assert "no problems found" in out
    assert main([*args, *accept]) == 0
    assert "rows 42: computed now 0, resumed 42; errors 2" in capsys.readouterr().out
