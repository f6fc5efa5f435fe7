"""A cluster whose autoscaler can add the nodes the actors ask for is waited for, not refused; a
plan that does not fit even on what it can grow to is refused before any work."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from pipeline import ConfigError, read_output
from pipeline.resources import Growth, NodeGroup, check_cluster
from tests.pipeline.conftest import OPTIONS, write_prompts

HEAD = [{"Resources": {"CPU": 2.0}, "Alive": True}]
GPU_WORKERS = Growth((NodeGroup("gpu", {"CPU": 8.0, "GPU": 1.0}, max_count=8),))


def test_actors_the_autoscaler_can_add_nodes_for_are_waited_for():
    message = check_cluster(actors=4, cpus=1.0, gpus=1.0, io_cpus=0.25, nodes=HEAD, growth=GPU_WORKERS)
    assert message.startswith("waiting for the cluster's autoscaler to add nodes: 4 actor(s) of 1 CPU and 1 GPU")
    assert "gpu (8 CPU, 1 GPU; up to 8)" in message
    assert check_cluster(actors=1, cpus=1.0, gpus=0.0, io_cpus=0.25, nodes=HEAD, growth=GPU_WORKERS) is None


def test_a_plan_beyond_what_the_cluster_can_grow_to_is_refused():
    with pytest.raises(ConfigError, match=r"resources\.actors: 9 actors of 1 CPU and 1 GPU each do not fit at once "
                                          r"\(.*can add nodes gpu \(8 CPU, 1 GPU; up to 8\): room for 8\)"):
        check_cluster(actors=9, cpus=1.0, gpus=1.0, io_cpus=0.25, nodes=HEAD, growth=GPU_WORKERS)
    with pytest.raises(ConfigError, match=r"resources\.gpus_per_actor: one actor asks for 1 CPU and 2 GPU"):
        check_cluster(actors=1, cpus=1.0, gpus=2.0, io_cpus=0.25, nodes=HEAD, growth=GPU_WORKERS)
    cpu_only = Growth((NodeGroup("cpu", {"CPU": 4.0}, max_count=-1),))
    with pytest.raises(ConfigError, match=r"resources\.gpus_per_actor: each actor asks for 1 GPU"):
        check_cluster(actors=1, cpus=1.0, gpus=1.0, io_cpus=0.25, nodes=HEAD, growth=cpu_only)
    with pytest.raises(ConfigError):  # no autoscaler: refused as before
        check_cluster(actors=1, cpus=1.0, gpus=1.0, io_cpus=0.25, nodes=HEAD)


def test_an_autoscaler_that_does_not_report_its_nodes_is_waited_for_with_a_warning():
    message = check_cluster(actors=2, cpus=1.0, gpus=1.0, io_cpus=0.25, nodes=HEAD, growth=Growth(known=False))
    assert "it does not report which nodes it can add, so the plan could not be checked" in message


def test_a_local_ray_without_an_autoscaler_cannot_grow(ray_runtime):
    from ray.experimental.internal_kv import _internal_kv_get

    from pipeline.dataflow import cluster_growth

    deadline = time.monotonic() + 30
    while not _internal_kv_get("__autoscaling_status") and time.monotonic() < deadline:
        time.sleep(0.5)  # its monitor's first status: it names the node as a read-only kind
    assert _internal_kv_get("__autoscaling_status")
    assert cluster_growth() is None  # so a GPU plan on it is refused, as before


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeAutoscalingCluster:
    """`ray.cluster_utils.AutoscalingCluster`'s set-up (Ray's fake node provider adds worker "nodes"
    on this machine as the autoscaler asks) on its own port and temporary directory, stopped by
    the ids of its own processes. AutoscalingCluster itself cannot be used here: its start and
    shutdown run `ray stop --force`, which stops every Ray on the machine, and the example config
    it reads (fake_multi_node/example.yaml) is not in Ray's wheel."""

    def __init__(self, head_cpus: int, worker_node_types: dict):
        self.port, self.head_cpus = _free_port(), head_cpus
        self.tmp = Path(tempfile.mkdtemp(prefix="ray-autoscaling-"))
        self.config = {
            "cluster_name": "fake_multinode", "max_workers": 8, "head_node_type": "ray.head.default",
            "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                         "disable_launch_config_check": True, "gcs_address": f"127.0.0.1:{self.port}"},
            "available_node_types": {**worker_node_types,
                                     "ray.head.default": {"resources": {}, "node_config": {}, "max_workers": 0}},
            "upscaling_speed": 1.0, "idle_timeout_minutes": 5, "docker": {}, "auth": {"ssh_user": "ubuntu"},
            "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
            "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
            "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": []}

    def start(self) -> str:
        config = self.tmp / "autoscaling.json"
        config.write_text(json.dumps(self.config))
        env = {**os.environ, "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_FAKE_CLUSTER": "1"}
        subprocess.check_call(["ray", "start", "--head", f"--port={self.port}", "--node-ip-address=127.0.0.1",
                               f"--num-cpus={self.head_cpus}", f"--temp-dir={self.tmp}", "--include-dashboard=false",
                               f"--autoscaling-config={config}", "--disable-usage-stats"], env=env,
                              stdout=subprocess.DEVNULL)
        return f"127.0.0.1:{self.port}"

    def pids(self) -> list[int]:
        mine = (str(self.tmp), f"127.0.0.1:{self.port}", f"--gcs_server_port={self.port}")
        found = []
        for proc in Path("/proc").iterdir():
            try:
                command = (proc / "cmdline").read_bytes().decode(errors="replace") if proc.name.isdigit() else ""
            except OSError:
                continue
            if any(m in command for m in mine) and int(proc.name) != os.getpid():
                found.append(int(proc.name))
        return found

    def stop(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in self.pids():
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            time.sleep(2)


@pytest.mark.slow
def test_a_job_waits_for_the_autoscaler_to_add_a_worker_and_commits(tiny_assets, tmp_path):
    model, pool = tiny_assets
    write_prompts(tmp_path / "in", (6,))
    # the worker type's GPU is Ray's bookkeeping only: the actor computes on the CPU (model.device)
    cluster = FakeAutoscalingCluster(2, {"gpu": {"resources": {"CPU": 1, "GPU": 1}, "node_config": {},
                                                 "min_workers": 0, "max_workers": 1}})
    job = {"model": {"path": str(model), "device": "cpu", "dtype": "float32"}, "adapters": {"path": str(pool)},
           "input": {"uri": str(tmp_path / "in")}, "output": {"uri": str(tmp_path / "out")},
           "resources": {"actors": 1, "batch_size": 8, "cpus_per_actor": 0.5, "gpus_per_actor": 1}, **OPTIONS}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    address = cluster.start()
    try:
        nodes = subprocess.run([sys.executable, "-c", "import ray; ray.init(address=%r); print(len(ray.nodes()))"
                                % address], capture_output=True, text=True, timeout=120).stdout.split()[-1]
        assert nodes == "1"  # the head only: no node has the GPU the actor asks for
        run = subprocess.run(["logo-batch", "run", "--config", str(tmp_path / "job.yaml"), "--address", address],
                             capture_output=True, text=True, timeout=600, env={**os.environ, "RAY_ADDRESS": address})
        assert run.returncode == 0, run.stderr[-3000:]
        assert "waiting for the cluster's autoscaler to add nodes" in run.stderr
        nodes = subprocess.run([sys.executable, "-c", "import ray; ray.init(address=%r); print(len(ray.nodes()))"
                                % address], capture_output=True, text=True, timeout=120).stdout.split()[-1]
        assert nodes == "2"  # the autoscaler added the GPU worker the actor ran on
        assert sorted(read_output(str(tmp_path / "out")).column("id").to_pylist()) == \
            sorted(f"part-0.parquet:{i}" for i in range(6))
    finally:
        cluster.stop()
    assert not cluster.pids()
