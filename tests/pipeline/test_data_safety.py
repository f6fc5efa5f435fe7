"""Nothing lost, nothing mixed: racing drivers, files changed under a run, a failed retry, input added
after a commit. Each test drives `logo-batch` as an operator would (drivers as processes of their
own, on the session's real Ray; local files and SeaweedFS), then reads the output as a user would
and counts every id."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from safetensors.torch import load_file, save_file

from jobs.cli import main
from pipeline import StorageConfig, read_output, run_job
from pipeline.errors import InjectedFault
from tests.pipeline.conftest import ADAPTERS, OPTIONS, SIZES, assert_matches_reference, job, reference, settle, write_prompts

ROOT = Path(__file__).resolve().parents[2]
EXPECTED = [f"part-{f}.parquet:{r}" for f, n in enumerate(SIZES) for r in range(n)]


def job_file(path: Path, model, pool, input_uri: str, output_uri: str, **sections) -> str:
    data = {"model": {"path": str(model)}, "adapters": {"path": str(pool)}, "input": {"uri": input_uri},
            "output": {"uri": output_uri}, **{k: dict(v) for k, v in OPTIONS.items()},
            "resources": {"actors": 1, "batch_size": 4, "rows_per_block": 6, "cpus_per_actor": 0.5}}
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values}
    path.write_text(yaml.safe_dump(data))
    return str(path)


def driver(ray_runtime, config: str, log: Path, *extra: str, address: str | None = None) -> subprocess.Popen:
    """`logo-batch run --config` as a process of its own, joined to the session's Ray (or `address`)."""
    address = address or ray_runtime.get_runtime_context().gcs_address
    env = {**os.environ, "RAY_ADDRESS": address, "RAY_AUTH_MODE": "disabled"}
    return subprocess.Popen([sys.executable, "-m", "jobs.cli", "run", "--config", config, *extra], cwd=ROOT, env=env,
                            stdout=log.open("wb"), stderr=subprocess.STDOUT)


def wait_for(predicate, what: str, timeout: float = 240.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the driver exited ({proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def data_files(client, bucket: str | None, out: str) -> list[str]:
    if bucket is None:
        return sorted(p.name for p in (Path(out) / "data").glob("part-*.parquet"))
    prefix = out.split(f"s3://{bucket}/", 1)[1] + "/data/"
    reply = client.list_objects_v2(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"].rsplit("/", 1)[-1] for o in reply.get("Contents", []))


def assert_whole(out: str, storage: StorageConfig, files: list[str]) -> None:
    """The committed run reads whole: every id once, every file its manifest lists there, no other."""
    table = read_output(out, storage)
    ids = table.column("id").to_pylist()
    assert len(ids) == len(set(ids)) == len(EXPECTED) and set(ids) == set(EXPECTED)
    manifest = json.loads(storage_read(out, storage, "_manifest.json"))
    assert sorted(f["path"].rsplit("/", 1)[-1] for f in manifest["output"]["files"]) == files


def storage_read(out: str, storage: StorageConfig, name: str) -> bytes:
    from pipeline import storage as st

    return st.read_bytes(st.join(out, name), storage)


@pytest.fixture(scope="module")
def shared_cluster(s3_credentials):
    """A Ray head of its own (8 logical CPUs) for two drivers at once: a paused driver keeps the
    resources its actor and read tasks hold, and the second one needs its own."""
    import tempfile

    from tests.jobs.test_submit import _alive_nodes, _ray_start, _stop
    from tests.conftest import _free_ports

    root = Path(tempfile.mkdtemp(prefix="lb-", dir="/tmp"))  # short: Ray's socket paths have a length limit
    gcs, dashboard_port, client_port = _free_ports(3)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS")}
    env.update(s3_credentials, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    head = _ray_start(["--head", "--num-cpus", "8", f"--port={gcs}", "--include-dashboard=true",
                       "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
                       f"--ray-client-server-port={client_port}", f"--temp-dir={root / 'ray'}"], env, root / "head.log")
    try:
        wait_for(lambda: _up(_alive_nodes, f"http://127.0.0.1:{dashboard_port}"), "the Ray head", timeout=120,
                 proc=head)
        yield f"127.0.0.1:{gcs}"
    finally:
        _stop(head)
        import shutil

        shutil.rmtree(root, ignore_errors=True)


def _up(alive_nodes, dashboard: str) -> bool:
    try:
        return alive_nodes(dashboard) >= 1
    except OSError:
        return False


@pytest.mark.slow  # about 3 minutes each on 2 CPU cores: a Ray of its own, two drivers, a pause past the lease
@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_driver_that_lost_its_lease_never_touches_the_run_another_committed(
        shared_cluster, ray_runtime, tiny_assets, s3_server, tmp_path, where, capsys):
    model, pool = tiny_assets
    write_prompts(tmp_path / "in", SIZES)
    if where == "s3":
        input_uri, out, bucket = s3_server.upload_dir(tmp_path / "in", "lease-race/in"), \
            f"s3://{s3_server.bucket}/lease-race/out", s3_server.bucket
    else:
        input_uri, out, bucket = str(tmp_path / "in"), str(tmp_path / "out"), None
    config = job_file(tmp_path / "job.yaml", model, pool, input_uri, out, run={"lease_timeout_s": 6},
                      storage={"endpoint": s3_server.endpoint, "cache_dir": str(tmp_path / "cache")})
    storage = StorageConfig(endpoint=s3_server.endpoint)
    client = s3_server.client()
    first = driver(ray_runtime, config, tmp_path / "a.log", address=shared_cluster)
    try:
        wait_for(lambda: len(data_files(client, bucket, out)) >= 2, "driver A's second data file", proc=first)
        first.send_signal(signal.SIGSTOP)  # A pauses with its dataflow running, past its lease's timeout
        time.sleep(7)
        second = driver(ray_runtime, config, tmp_path / "b.log", address=shared_cluster)
        assert second.wait(timeout=300) == 0, (tmp_path / "b.log").read_text()[-3000:]  # B takes over, commits
        assert "taking over the lease" in (tmp_path / "b.log").read_text()
        committed = data_files(client, bucket, out)
        assert_whole(out, storage, committed)
        first.send_signal(signal.SIGCONT)
        assert first.wait(timeout=180) == 2
    finally:
        first.send_signal(signal.SIGCONT)
        first.kill()
    said = (tmp_path / "a.log").read_text()
    assert "lost the lease" in said and "this driver stops without deleting, writing or committing" in said
    assert "Traceback" not in said
    assert data_files(client, bucket, out) == committed  # A deleted nothing and wrote nothing more
    assert_whole(out, storage, committed)
    capsys.readouterr()
    assert main(["run", "--config", config]) == 0
    assert "already committed; nothing to do" in capsys.readouterr().err
    assert main(["validate", "--config", config]) == 0
    assert "no problems found" in capsys.readouterr().out


def _perturb(weights: Path) -> None:
    """Replace an adapter's weights in place: same names and shapes, other values."""
    tensors = load_file(str(weights))
    save_file({k: v * 3 + 0.05 for k, v in tensors.items()}, str(weights))


@pytest.mark.slow  # a driver process of its own and a resume: about a minute here
def test_an_adapter_replaced_mid_run_stops_the_run_naming_it(ray_runtime, tiny_assets, tmp_path, capsys):
    import shutil

    model, pool = tiny_assets
    pool = shutil.copytree(pool, tmp_path / "pool")
    prompts = write_prompts(tmp_path / "in", SIZES)
    config = job_file(tmp_path / "job.yaml", model, pool, str(tmp_path / "in"), str(tmp_path / "out"),
                      adapters={"max_resident": 2})
    weights = pool / ADAPTERS[0] / "adapter_model.safetensors"
    original = weights.read_bytes()
    proc = driver(ray_runtime, config, tmp_path / "run.log")
    try:
        wait_for(lambda: len(data_files(None, None, str(tmp_path / "out"))) >= 1, "the first data file", proc=proc)
        _perturb(weights)
        code = proc.wait(timeout=240)
    finally:
        proc.kill()
    said = (tmp_path / "run.log").read_text()
    settle(tmp_path / "out" / "data")
    if code == 0:  # every later row used adapters that stayed resident: then one version only
        table = read_output(str(tmp_path / "out"))
    else:
        assert code == 2, said
        # found before a read (its pin no longer matches) or during one (its stamp moved): both stop the run
        assert f"adapter 'arith' file {weights} changed " in said, said
        assert "the run stops so that it never mixes two versions" in said, said
        assert "Traceback" not in said
        assert main(["run", "--config", config]) == 2  # a resume is refused too, naming the file
        assert f"adapter file {ADAPTERS[0]}/adapter_model.safetensors changed" in capsys.readouterr().err
        weights.write_bytes(original)  # restored: the resume computes the rest with the version pinned
        assert main(["run", "--config", config]) == 0
        table = read_output(str(tmp_path / "out"))
    ids = table.column("id").to_pylist()
    assert len(ids) == len(set(ids)) == len(EXPECTED)
    weights.write_bytes(original)
    assert_matches_reference(table, reference(model, pool, prompts), EXPECTED)  # every row: the original weights


@pytest.mark.slow  # a driver process of its own on SeaweedFS: about a minute here
def test_a_pool_changed_on_s3_mid_run_is_never_mixed_into_the_run(ray_runtime, tiny_assets, s3_server, tmp_path,
                                                                  capsys):
    model, pool = tiny_assets
    prompts = write_prompts(tmp_path / "in", SIZES)
    pool_uri = s3_server.upload_dir(pool, "pool-change/pool")
    out = f"s3://{s3_server.bucket}/pool-change/out"
    config = job_file(tmp_path / "job.yaml", model, pool_uri, str(tmp_path / "in"), out,
                      adapters={"max_resident": 2},
                      storage={"endpoint": s3_server.endpoint, "cache_dir": str(tmp_path / "cache")})
    client = s3_server.client()
    changed = tmp_path / "changed.safetensors"
    changed.write_bytes((pool / ADAPTERS[0] / "adapter_model.safetensors").read_bytes())
    _perturb(changed)
    proc = driver(ray_runtime, config, tmp_path / "run.log")
    try:
        wait_for(lambda: len(data_files(client, s3_server.bucket, out)) >= 1, "the first data file", proc=proc)
        client.upload_file(str(changed), s3_server.bucket, f"pool-change/pool/{ADAPTERS[0]}/adapter_model.safetensors")
        capsys.readouterr()
        assert main(["validate", "--config", config]) == 2  # downloads the new pool beside the copy the job reads
        assert f"adapter file {ADAPTERS[0]}/adapter_model.safetensors changed" in capsys.readouterr().out
        code = proc.wait(timeout=240)
    finally:
        proc.kill()
    said = (tmp_path / "run.log").read_text()
    assert code == 0, said  # the running actors read only their own copy, which never changes
    caches = sorted(p.name for p in (tmp_path / "cache").iterdir() if p.is_dir() and p.name != "routing-index")
    assert len(caches) == 2 and len({c.split("-")[0] for c in caches}) == 1  # the pool as pinned and as changed
    table = read_output(out, StorageConfig(endpoint=s3_server.endpoint))
    assert_matches_reference(table, reference(model, pool, prompts), EXPECTED)  # one version: the pinned one
    capsys.readouterr()
    assert main(["run", "--config", config, "--retry-errors"]) == 2  # a retry now would mix versions: refused
    assert f"adapter file {ADAPTERS[0]}/adapter_model.safetensors changed" in capsys.readouterr().err


def test_calibration_statistics_are_pinned_and_checked_before_they_are_stored(ray_runtime, tiny_assets, tmp_path,
                                                                               capsys):
    model, pool = tiny_assets
    write_prompts(tmp_path / "in", SIZES)
    out = tmp_path / "out"
    config = job(model, pool, str(tmp_path / "in"), str(out), routing={"calibration": "input"},
                 resources={"actors": 1, "rows_per_block": 20})
    with pytest.raises(InjectedFault):
        run_job(config, fail_after_files=2, progress=False)
    settle(out / "data")
    stats_file = out / "_calibration.json"
    pinned = stats_file.read_bytes()
    record = json.loads((out / "_job.json").read_text())
    assert record["calibration"].startswith("sha256:")
    def command(output, calibration="input"):
        return ["--model", str(model), "--adapters", str(pool), "--input", str(tmp_path / "in"), "--output",
                str(output), "--k", "2", "--max-new-tokens", "3", "--actors", "1", "--calibration", calibration,
                "--set", "resources.rows_per_block=20"]

    args = ["run", *command(out)]
    swapped = json.loads(pinned)
    swapped["mean"] = [[m * 1.5 for m in row] for row in swapped["mean"]]  # other valid statistics
    for damaged in (json.dumps(swapped).encode(), pinned[: len(pinned) // 2]):  # swapped, then truncated
        stats_file.write_bytes(damaged)
        capsys.readouterr()
        assert main(args) == 2
        err = capsys.readouterr().err
        assert f"{stats_file} changed since the run started" in err and "Traceback" not in err
        assert main(["validate", *args[1:]]) == 2
        assert f"{stats_file} changed since the run started" in capsys.readouterr().out
    stats_file.write_bytes(pinned)
    assert main(args) == 0
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["calibration"]["sha256"] == record["calibration"].removeprefix("sha256:")
    assert len(set(read_output(str(out)).column("id").to_pylist())) == len(EXPECTED)

    # a statistics file made for another pool: refused before anything is stored, by validate and run alike
    other = dict(json.loads(pinned), adapters=["arith", "copy", "shout", "other"])
    (tmp_path / "other.json").write_text(json.dumps(other))
    fresh = command(tmp_path / "fresh", str(tmp_path / "other.json"))
    for name in ("validate", "run"):
        capsys.readouterr()
        assert main([name, *fresh]) == 2
        said = capsys.readouterr()
        assert "routing.calibration" in said.out + said.err and "another adapter pool" in said.out + said.err
    assert not (tmp_path / "fresh" / "_calibration.json").exists() and not (tmp_path / "fresh" / "_job.json").exists()


def test_a_failed_retry_leaves_the_committed_run_exactly_as_it_was(ray_runtime, tiny_assets, tmp_path, capsys):
    model, pool = tiny_assets
    (tmp_path / "in").mkdir()
    prompts = ["add 1 and 2", None, "add 3 and 4", "", "add 5 and 6", "add 7 and 8"]
    pq.write_table(pa.table({"prompt": prompts}), tmp_path / "in" / "p.parquet")
    out = tmp_path / "out"
    args = ["run", "--model", str(model), "--adapters", str(pool), "--input", str(tmp_path / "in"),
            "--output", str(out), "--max-new-tokens", "2", "--actors", "1", "--batch-size", "2",
            "--set", "resources.rows_per_block=2"]
    assert main(args + ["--set", "run.max_error_fraction=0.5"]) == 0  # committed with its 2 error rows
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != "_lease.json"}
    table = read_output(str(out))
    capsys.readouterr()
    assert main(args + ["--retry-errors"]) == 3  # the cause is not fixed: the rows fail again
    assert "2 of 6 rows" in capsys.readouterr().err
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != "_lease.json"}
    assert after == before  # marker, manifest, report, every data file: byte for byte, and nothing else
    assert read_output(str(out)).equals(table)
    assert main(args) == 0 and "already committed" in capsys.readouterr().err
    assert main(args + ["--retry-errors", "--set", "run.max_error_fraction=0.5"]) == 0  # accepted this time
    retried = read_output(str(out))
    assert sorted(retried.column("id").to_pylist()) == sorted(table.column("id").to_pylist())
    manifest = json.loads((out / "_manifest.json").read_text())
    listed = sorted(f["path"].rsplit("/", 1)[-1] for f in manifest["output"]["files"])
    assert sorted(p.name for p in (out / "data").iterdir()) == listed  # the files it replaced are gone, no stray
    assert manifest["errors"]["rows"] == 2


def test_input_changed_after_a_commit_is_reported_by_run_and_validate(ray_runtime, tiny_assets, tmp_path, capsys):
    model, pool = tiny_assets
    write_prompts(tmp_path / "in", (5, 4))
    args = ["--model", str(model), "--adapters", str(pool), "--input", str(tmp_path / "in"), "--output",
            str(tmp_path / "out"), "--max-new-tokens", "2", "--actors", "1", "--calibration", "reference"]
    assert main(["run", *args]) == 0
    manifest = (tmp_path / "out" / "_manifest.json").read_bytes()
    pq.write_table(pa.table({"prompt": ["one more", "and another"]}), tmp_path / "in" / "part-9.parquet")
    capsys.readouterr()
    assert main(["run", *args]) == 2
    err = capsys.readouterr().err
    assert "input file part-9.parquet was added" in err and "--overwrite" in err and "nothing to do" not in err
    assert main(["validate", *args]) == 2
    said = capsys.readouterr().out
    assert "input file part-9.parquet was added" in said
    assert "a run would do nothing" not in said and "rows to compute" not in said and "no problems found" not in said
    (tmp_path / "in" / "part-9.parquet").unlink()
    (tmp_path / "in" / "part-1.parquet").write_bytes((tmp_path / "in" / "part-1.parquet").read_bytes())  # touched
    assert main(["run", *args]) == 2 and "input file part-1.parquet changed" in capsys.readouterr().err
    assert (tmp_path / "out" / "_manifest.json").read_bytes() == manifest  # the committed run is left as it was
    pq.write_table(pa.table({"prompt": ["one more", "and another"]}), tmp_path / "in" / "part-9.parquet")
    assert main(["run", *args, "--overwrite"]) == 0  # what the message says to do
    assert len(read_output(str(tmp_path / "out"))) == 11
    assert main(["validate", *args]) == 0 and "a run would do nothing" in capsys.readouterr().out


def test_nightly_refuses_an_input_without_date_unless_forced(tmp_path, capsys):
    from jobs.nightly import night_config
    from tests.jobs.test_nightly import nightly_file

    fixed = nightly_file(tmp_path, "m", "a", "in/fixed", "o/{date}")
    assert main(["nightly", "--config", fixed, "--date", "2026-11-27"]) == 2
    assert "input.uri: has no {date} field, so every night would read the same input" in capsys.readouterr().err
    assert night_config(fixed, "2026-11-27", fixed_input=True).input.uri == "in/fixed"



def test_the_driver_checks_statistics_without_loading_torch(tiny_assets, tmp_path):
    """The driver of a job never imports torch (a Ray Jobs driver that did crashed loading it)."""
    model, pool = tiny_assets
    code = ("import sys\nfrom pipeline import config_from_dict\nfrom pipeline.calibration import check_statistics\n"
            f"config = config_from_dict({{'model': {{'path': {str(model)!r}}}, 'adapters': {{'path': {str(pool)!r}}},"
            " 'input': {'uri': 'i'}, 'output': {'uri': 'o'}})\n"
            "try:\n    check_statistics({'adapters': ['x']}, config)\nexcept ValueError as err:\n"
            "    assert 'another adapter pool' in str(err), err\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\nprint('ok')\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
