"""Fixtures for the job commands: the tiny model and pool of the pipeline tests, and a local Ray."""

from __future__ import annotations

import os

import pytest

from tests.pipeline.conftest import tiny_assets  # noqa: F401  (a fixture)


@pytest.fixture(scope="session")
def local_ray(s3_credentials):
    """A local Ray with 2 CPUs (the one the pipeline tests started, when they run in this session)."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    if started:
        ray.shutdown()
