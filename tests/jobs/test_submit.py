"""`logo-batch submit --wait` on a real two-node Ray cluster (`ray start`), model, pool, input and
output on SeaweedFS; `logo-batch run --address` against the same cluster.

The nodes run without this checkout on their PYTHONPATH: the project reaches them only through
the job's runtime environment. Each node has its own model cache, and each must have downloaded
the model and the pool exactly once.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import StorageConfig, read_output
from pipeline.fetch import DOWNLOADS
from pipeline.run_report import REPORT_JSON
from tests.conftest import _free_ports
from tests.pipeline.conftest import prompt

ROOT = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))
NODE_PORTS = ("node-manager-port", "object-manager-port", "dashboard-agent-grpc-port",
              "dashboard-agent-listen-port", "metrics-export-port", "runtime-env-agent-port")
ROWS = 24


def _ray_start(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    ports = dict(zip(NODE_PORTS, _free_ports(len(NODE_PORTS))))
    command = [RAY, "start", "--block", "--num-cpus", "1", "--num-gpus", "0", "--node-ip-address", "127.0.0.1",
               *args, *(f"--{name}={port}" for name, port in ports.items())]
    with open(log, "wb") as out:
        return subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()  # `ray start --block` stops the node's processes when it is terminated
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _alive_nodes(dashboard: str) -> int:
    with urllib.request.urlopen(f"{dashboard}/api/v0/nodes?limit=10", timeout=5) as reply:
        nodes = json.loads(reply.read())["data"]["result"]["result"]
    return sum(node["state"] == "ALIVE" for node in nodes)


@pytest.fixture(scope="module")
def cluster(s3_credentials):
    """A Ray head and a second node on free loopback ports, each with its own model cache."""
    root = Path(tempfile.mkdtemp(prefix="lb-", dir="/tmp"))  # short: Ray's socket paths have a length limit
    gcs, dashboard_port, client_port = _free_ports(3)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS")}
    env.update(s3_credentials, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")  # the nodes' python
    procs = [_ray_start(["--head", f"--port={gcs}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                         f"--dashboard-port={dashboard_port}", f"--ray-client-server-port={client_port}",
                         f"--temp-dir={root / 'ray'}"],
                        {**env, "LOGO_BATCH_CACHE": str(root / "cache-head")}, root / "head.log")]
    dashboard = f"http://127.0.0.1:{dashboard_port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                if _alive_nodes(dashboard) >= 1:
                    break
            except OSError:
                pass
            assert procs[0].poll() is None, (root / "head.log").read_text()[-3000:]
            assert time.time() < deadline, "the Ray head did not come up within 120 s"
            time.sleep(1)
        procs.append(_ray_start([f"--address=127.0.0.1:{gcs}"], {**env, "LOGO_BATCH_CACHE": str(root / "cache-node")},
                                root / "node.log"))
        while _alive_nodes(dashboard) < 2:
            assert procs[1].poll() is None, (root / "node.log").read_text()[-3000:]
            assert time.time() < deadline, "the second Ray node did not join within 120 s"
            time.sleep(1)
        yield {"dashboard": dashboard, "gcs": f"127.0.0.1:{gcs}", "root": root, "env": env}
    finally:
        for proc in reversed(procs):
            _stop(proc)
        shutil.rmtree(root, ignore_errors=True)


def _cli(args: list[str], env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**env, "PYTHONPATH": str(ROOT)}  # the command itself runs from this checkout
    return subprocess.run([sys.executable, "-m", "jobs.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow  # about 2.5 minutes on 2 CPU cores: two Ray nodes, a job, then a second run
def test_submit_wait_on_two_nodes_fetches_once_per_node(cluster, tiny_assets, s3_server, tmp_path):
    model, pool = tiny_assets
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"prompt": [prompt(i) for i in range(ROWS)]}), tmp_path / "in" / "p.parquet")
    base = f"s3://{s3_server.bucket}/submit"
    model_uri = s3_server.upload_dir(model, "submit/model")
    pool_uri = s3_server.upload_dir(pool, "submit/pool")
    input_uri = s3_server.upload_dir(tmp_path / "in", "submit/in")
    job = tmp_path / "job.yaml"
    # one 0.75-CPU actor fits on each 1-CPU node, and leaves each node a quarter CPU to read and write
    job.write_text(f"model: {{path: '{model_uri}'}}\nadapters: {{path: '{pool_uri}'}}\ninput: {{uri: '{input_uri}'}}\n"
                   f"output: {{uri: '{base}/out'}}\nrouting: {{k: 2}}\ngeneration: {{max_new_tokens: 2}}\n"
                   "resources: {actors: 2, batch_size: 4, rows_per_block: 4, cpus_per_actor: 0.75}\n"
                   f"storage: {{endpoint: '{s3_server.endpoint}'}}\n")

    done = _cli(["submit", "--address", cluster["dashboard"], "--config", str(job), "--wait"], cluster["env"])

    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "SUCCEEDED" in done.stdout and "logo-batch run committed" in done.stdout
    assert not [line for line in done.stdout.splitlines() if " E " in line[:40] or "ERROR" in line], done.stdout
    storage = StorageConfig(endpoint=s3_server.endpoint)
    table = read_output(f"{base}/out", storage)
    assert sorted(table.column("id").to_pylist()) == sorted(f"p.parquet:{i}" for i in range(ROWS))
    assert table.column("error").null_count == ROWS
    report = s3_server.client().get_object(Bucket=s3_server.bucket, Key=f"submit/out/{REPORT_JSON}")  # under _report/
    assert json.loads(report["Body"].read())["rows"] == ROWS
    for node in ("cache-head", "cache-node"):
        logs = sorted((cluster["root"] / node).glob(f"*{DOWNLOADS}"))
        fetched = sorted(line.split(" pid ")[0] for path in logs for line in path.read_text().splitlines())
        assert fetched == sorted([model_uri, pool_uri]), (node, fetched)

    # the driver here, the actors on the cluster (the nodes' caches are warm: nothing fetched again)
    again = _cli(["run", "--config", str(job), "--address", cluster["gcs"], "--output", f"{base}/again",
                  "--set", "resources.actors=1"], cluster["env"])
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"rows {ROWS}: computed now {ROWS}" in again.stdout
    assert read_output(f"{base}/again", storage).num_rows == ROWS
    for node in ("cache-head", "cache-node"):
        assert sum(len(p.read_text().splitlines()) for p in (cluster["root"] / node).glob(f"*{DOWNLOADS}")) == 2


def test_job_carries_the_project_and_the_job_file_and_its_command_parses(tmp_path, monkeypatch):
    from jobs.cli import build_parser
    from jobs.submit import JOB_FILE, PACKAGES, entrypoint, runtime_env

    job = tmp_path / "mine.yaml"
    job.write_text("model: {path: m}\n")
    workdir = tmp_path / "work"
    workdir.mkdir()
    monkeypatch.setenv("LOGO_TEST_VAR", "42")
    env = runtime_env(job, workdir, ["LOGO_TEST_VAR"])
    assert (workdir / JOB_FILE).read_text() == job.read_text() and sorted(workdir.iterdir()) == [workdir / JOB_FILE]
    assert env["working_dir"] == str(workdir) and env["env_vars"] == {"LOGO_TEST_VAR": "42"}
    assert [Path(p) for p in env["py_modules"]] == [ROOT / name for name in PACKAGES]
    assert all((ROOT / name / "__init__.py").is_file() for name in PACKAGES)
    line = entrypoint("nightly", ["routing.k=5", "output.uri=s3://b/o/{date}"], ["--date=2026-11-28", "--force"])
    words = line.split()
    assert words[:3] == ["python", "-m", "jobs.cli"]
    args = build_parser(load_all=True).parse_args(shlex.split(line)[3:])
    assert (args.command, args.config, args.date, args.force) == ("nightly", JOB_FILE, "2026-11-28", True)
    assert args.set_items == ["routing.k=5", "output.uri=s3://b/o/{date}"]
    with pytest.raises(ValueError, match="--env LOGO_NOT_SET: not set"):
        runtime_env(job, workdir, ["LOGO_NOT_SET"])


@pytest.mark.slow  # a Ray head of its own (about 30 s)
def test_submit_to_a_token_cluster_without_the_token_is_one_line_with_the_fix(tmp_path):
    """A `ray start` cluster with token authentication (Ray's default for `ray start`), a client
    without the token: one line naming RAY_AUTH_MODE=token and where the token is, exit 2."""
    import urllib.error

    root = Path(tempfile.mkdtemp(prefix="lbt-", dir="/tmp"))
    gcs, dashboard_port, client_port = _free_ports(3)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS", "RAY_AUTH_MODE")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="a" * 32, RAY_USAGE_STATS_ENABLED="0",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    head = _ray_start(["--head", f"--port={gcs}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                       f"--dashboard-port={dashboard_port}", f"--ray-client-server-port={client_port}",
                       f"--temp-dir={root / 'ray'}"], env, root / "head.log")
    dashboard = f"http://127.0.0.1:{dashboard_port}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"{dashboard}/api/version", timeout=5)
                break
            except urllib.error.HTTPError:
                break  # it answers (and asks for the token)
            except OSError:
                time.sleep(1)
        job = tmp_path / "job.yaml"
        job.write_text("model: {path: m}\nadapters: {path: a}\ninput: {uri: i}\noutput: {uri: o}\n")
        client_env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        client_env.update(PYTHONPATH=str(ROOT), HOME=str(tmp_path))  # no token anywhere
        done = subprocess.run([sys.executable, "-m", "jobs.cli", "submit", "--address", dashboard, "--config", str(job)],
                              env=client_env, capture_output=True, text=True, timeout=120)
        lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
        assert done.returncode == 2, lines
        assert len(lines) == 1 and "RAY_AUTH_MODE=token" in lines[0] and "auth_token" in lines[0], lines
    finally:
        _stop(head)
        shutil.rmtree(root, ignore_errors=True)
