"""A driver that started its own local Ray and is killed with SIGKILL leaves no process behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline import watchdog
from tests.pipeline.conftest import write_prompts
from tests.pipeline.test_data_safety import ROOT, data_files, job_file, wait_for


def _tree(pid: int) -> dict[int, int]:
    """pid -> start time of `pid`'s live descendants."""
    table = watchdog._table()
    tracked: dict[int, int] = {}
    watchdog._track(tracked, {child for child, (parent, _) in table.items() if parent == pid})
    return tracked


@pytest.mark.slow
def test_a_killed_driver_leaves_no_ray_process_behind(tiny_assets, tmp_path):
    model, pool = tiny_assets
    write_prompts(tmp_path / "in", (60, 60))
    config = job_file(tmp_path / "job.yaml", model, pool, str(tmp_path / "in"), str(tmp_path / "out"))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # no cluster to join: it starts its own
    with open(tmp_path / "run.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "jobs.cli", "run", "--config", config], cwd=ROOT, env=env,
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: len(data_files(None, None, str(tmp_path / "out"))) >= 1, "the first data file", proc=proc)
        started = _tree(proc.pid)
        names = {pid: Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")[:80] for pid in started}
        assert any(b"raylet" in n for n in names.values()) and any(b"dashboard" in n or b"agent" in n
                                                                 for n in names.values()), names
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 30
        while (alive := [p for p, t in started.items() if (s := watchdog._stat(p)) and s[1] == t]) and \
                time.monotonic() < deadline:
            time.sleep(0.5)
        assert not alive, {p: names[p] for p in alive}
    finally:
        proc.kill()


def test_the_watchdog_stops_the_trees_it_watches_once_the_driver_dies(tmp_path):
    driver = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    child = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; "
                              "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)"],
                             start_new_session=True)  # like Ray's agents: not in the driver's process group
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # not watched
    try:
        guard = watchdog.watch(driver.pid, {child.pid})
        time.sleep(1.5)  # it has seen the grandchild
        tree = _tree(child.pid) | {child.pid: watchdog._stat(child.pid)[1]}
        assert len(tree) == 2
        driver.kill()
        driver.wait()
        guard.wait(timeout=20)
        assert all(watchdog._stat(p) is None or watchdog._stat(p)[1] != t for p, t in tree.items())
        assert other.poll() is None  # only the watched trees are stopped
    finally:
        for p in (driver, child, other):
            p.kill()
