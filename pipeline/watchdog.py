"""A watchdog for the local Ray a driver starts: when the driver dies, even by SIGKILL, every
process that Ray started for it (the GCS, raylet, dashboard and runtime-env agents, workers) is
stopped, so a killed run leaves nothing behind.

    watch(driver, roots)   start `python -m pipeline.watchdog DRIVER ROOT...` in a session of its
                           own; every half second it adds the descendants of the roots (the
                           processes `ray.init` started) to what it tracks, each by process id
                           and start time; once the driver is gone it sends SIGTERM to every
                           tracked process still alive, then SIGKILL to what is left, and exits

Processes are read from /proc (Linux; elsewhere nothing is watched). A process the driver started
itself, before or after Ray, is not tracked: only what descends from Ray's own processes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

POLL_S = 0.5
GRACE_S = 3.0


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks) of a live process, else None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    if fields[0] == "Z":  # a zombie: already dead
        return None
    return int(fields[1]), int(fields[19])


def _table() -> dict[int, tuple[int, int]]:
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (info := _stat(int(entry))) is not None:
            out[int(entry)] = info
    return out


def children(pid: int | None = None) -> set[int]:
    """Process ids of the direct children of `pid` (default: this process); empty without /proc."""
    pid = os.getpid() if pid is None else pid
    if not os.path.isdir("/proc"):
        return set()
    return {child for child, (parent, _) in _table().items() if parent == pid}


def watch(driver: int, roots: set[int]) -> subprocess.Popen | None:
    """Start the watchdog of `driver` over the process trees of `roots` (see the module docstring)."""
    if not roots or not os.path.isdir("/proc"):
        return None
    return subprocess.Popen([sys.executable, "-m", "pipeline.watchdog", str(driver), *map(str, sorted(roots))],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, cwd="/",
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [
                                str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH")]))})


def _track(tracked: dict[int, int], roots: set[int]) -> None:
    """Add every live process of the roots' trees to `tracked` (pid -> start time)."""
    table = _table()
    kids: dict[int, list[int]] = {}
    for pid, (parent, _) in table.items():
        kids.setdefault(parent, []).append(pid)
    todo, seen = [pid for pid in roots if pid in table], {os.getpid()}
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        tracked[pid] = table[pid][1]
        todo += kids.get(pid, [])


def _alive(tracked: dict[int, int]) -> list[int]:
    return [pid for pid, start in tracked.items() if (info := _stat(pid)) is not None and info[1] == start]


def main(argv: list[str]) -> int:
    driver, roots = int(argv[0]), {int(a) for a in argv[1:]}
    tracked: dict[int, int] = {}
    _track(tracked, roots)  # first: a driver already gone still leaves its Ray to be stopped
    first = _stat(driver)
    while first is not None and (now := _stat(driver)) is not None and now[1] == first[1]:
        time.sleep(POLL_S)
        _track(tracked, roots)
    for sig, wait in ((signal.SIGTERM, GRACE_S), (signal.SIGKILL, 0.0)):
        for pid in _alive(tracked):
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.monotonic() + wait
        while _alive(tracked) and time.monotonic() < deadline:
            time.sleep(0.1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
