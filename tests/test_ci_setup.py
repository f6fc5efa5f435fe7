"""The two entry commands share one set-up path (`.ci/setup`): it creates the virtual environment
when missing or stale, and only activates it when it matches the checkout (the quick second time)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SETUP = ROOT / ".ci" / "setup"
PROBE = "python -c 'import os, sys; print(sys.prefix); print(os.environ[\"RAY_AUTH_MODE\"])'"


def _source_setup(venv: Path, then: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "RAY_AUTH_MODE")}
    env["LOGO_BATCH_VENV"] = str(venv)
    return subprocess.run(["bash", "-c", f". {SETUP} && {then}"], cwd="/", env=env, capture_output=True, text=True,
                          timeout=3600)


def test_entry_commands_source_the_one_setup_path():
    for name in ("run", "demo"):
        text = (ROOT / ".ci" / name).read_text()
        assert '. "$(dirname "$0")/setup"' in text, name
        assert "pip install" not in text, f".ci/{name} installs by itself instead of through .ci/setup"
    assert "python -m pytest -q" in (ROOT / ".ci" / "run").read_text()
    assert "logo-batch demo" in (ROOT / ".ci" / "demo").read_text()


def test_a_matching_environment_is_only_activated(tmp_path):
    """The quick path: a virtual environment stamped for this checkout gets no install."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    stamp = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + SETUP.read_bytes()).hexdigest()
    (venv / ".logo-batch-setup").write_text(stamp + "\n")
    done = _source_setup(venv, f"{PROBE} && pwd")
    assert done.returncode == 0, done.stderr
    prefix, auth, cwd = done.stdout.split()
    assert Path(prefix) == venv and auth == "disabled" and Path(cwd) == ROOT
    assert f"{venv} is up to date" in done.stderr and "installing" not in done.stderr


@pytest.mark.slow  # a full install (minutes)
def test_from_scratch_then_quick(tmp_path):
    venv = tmp_path / "venv"
    first = _source_setup(venv, "python -c 'import actors, pipeline, jobs, torch; print(torch.__version__)'")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "installing" in first.stderr and first.stdout.strip() == "2.13.0+cpu"
    again = _source_setup(venv, PROBE)
    assert again.returncode == 0 and f"{venv} is up to date" in again.stderr
    assert Path(again.stdout.split()[0]) == venv
