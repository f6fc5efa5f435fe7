"""The predictor's options: one set of dataclasses, keyword shortcuts mapped onto them, no torch to read them."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from actors import LoGoPredictor
from actors.options import PAPER_ROUTING, GenerationConfig, RoutingConfig, build_options, field_names
from tests.actors.conftest import PROMPTS

TESTS = Path(__file__).resolve().parent


def test_reading_the_options_loads_no_torch():
    code = ("import sys, actors.options; from actors import RoutingConfig, GenerationConfig, OUTPUT_COLUMNS; "
            "RoutingConfig(k=2); print('torch' in sys.modules, 'transformers' in sys.modules); "
            "from actors import LoGoPredictor; print('torch' in sys.modules, LoGoPredictor.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False", "True", "LoGoPredictor"]


def imported_modules(source: str) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_actor_tests_import_nothing_from_jobs_or_pipeline():
    assert imported_modules("def f():\n    from pipeline.config import X\nimport jobs.cli") == {"pipeline.config",
                                                                                            "jobs.cli"}
    offending = {f"{path.name}: {name}" for path in sorted(TESTS.glob("*.py"))
                 for name in imported_modules(path.read_text())
                 if name.split(".")[0] in ("jobs", "pipeline", "ray")}
    assert not offending, f"tests/actors must test the actors alone: {sorted(offending)}"


def test_shortcuts_map_onto_the_dataclasses():
    routing, generation = build_options(None, None, dict(k=3, probe_layer=-1, max_new_tokens=5,
                                                         generate_step_slots=0.0))
    assert routing == RoutingConfig(k=3, probe_layers=-1)
    assert generation == GenerationConfig(max_new_tokens=5, generate_step_slots=0.0)
    given = RoutingConfig(k=2, probe_module=["q_proj"])
    assert build_options(given, None, dict(k=2, probe_module=("q_proj",)))[0] is not None, "agreeing values pass"
    with pytest.raises(ValueError, match=r"^k=4 and routing=RoutingConfig\(k=2, \.\.\.\) disagree"):
        build_options(given, None, dict(k=4))
    with pytest.raises(ValueError, match="not also probe_layer"):
        build_options(None, None, dict(probe_layers=-1, probe_layer=-2))
    assert set(field_names(RoutingConfig)) >= set(PAPER_ROUTING)


def test_predictor_takes_the_dataclasses_and_routes_as_with_shortcuts(tiny_dir, pool_dir):
    routing = RoutingConfig(k=2, calibration_score="raw")
    generation = GenerationConfig(max_new_tokens=4, generate_step_slots=0.0,
                                  probe_bucket_overhead=float("inf"), stop_strings=["\n\n"])
    built = LoGoPredictor(tiny_dir, pool_dir, routing=routing, generation=generation, device="cpu")
    assert built.engine.routing == routing and built.engine.generation == generation
    short = LoGoPredictor(tiny_dir, pool_dir, k=2, calibration_score="raw", max_new_tokens=4,
                          generate_step_slots=0.0, probe_bucket_overhead=float("inf"),
                          stop_strings=["\n\n"], device="cpu")
    assert short.engine.routing == routing and short.engine.generation == generation
    prompts = np.array(PROMPTS[:6], dtype=object)
    a, b = built({"prompt": prompts}), short({"prompt": prompts})
    assert list(a["output"]) == list(b["output"]) and list(a["adapters"]) == list(b["adapters"])
    assert all(len(names) == 2 for names in a["adapters"])
    lengths = {len(built.encode(p)[0]) for p in prompts}
    assert built.last_stats.calls == len(lengths), "generate_step_slots=0 reached the engine: a call per length"
