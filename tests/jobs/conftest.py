"""Fixtures for the job commands: the tiny model and pool of the pipeline tests."""

from __future__ import annotations

from tests.pipeline.conftest import tiny_assets  # noqa: F401  (a fixture)
