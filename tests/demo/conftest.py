"""Fixtures for the demo tests: SmolLM2-135M-Instruct, converted on first use, loaded once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def demo_model_dir() -> Path:
    from jobs.demo.model import ensure_demo_model

    return ensure_demo_model()


@pytest.fixture(scope="session")
def demo_model(demo_model_dir: Path):
    """(model, tokenizer) in float32 on the CPU, in eval mode; tests must not modify the model."""
    from actors.base import load_base

    return load_base(demo_model_dir, torch.float32, torch.device("cpu"))
