"""The option tables of the package READMEs are generated from the dataclasses (`python -m jobs.docs`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from jobs import docs

ROOT = Path(__file__).resolve().parents[2]


def test_checked_in_tables_match_the_code():
    assert docs.main(["--check"]) == 0, "run python -m jobs.docs"


def test_every_section_and_predictor_option_has_its_table():
    from actors import options
    from pipeline import config

    text = {name: (ROOT / name).read_text() for name in docs.READMES}
    for cls in (options.RoutingConfig, options.GenerationConfig):
        assert f"<!-- options: actors.options.{cls.__name__} -->" in text["actors/README.md"]
    for name in ("ModelConfig", "AdaptersConfig", "RoutingConfig", "GenerationConfig", "InputConfig",
                 "OutputConfig", "ResourcesConfig", "StorageConfig", "RunConfig"):
        cls = getattr(config, name)
        assert f"<!-- options: pipeline.config.{name} -->" in text["pipeline/README.md"]
        table = docs.table(cls)
        for f in dataclasses.fields(cls):
            assert f"| `{cls.section}.{f.name}` |" in table, f"{name}.{f.name} missing"
            assert f"| `{cls.section}.{f.name}` |" in text["pipeline/README.md"]


def test_a_table_that_drifted_is_found_and_rewritten():
    text = (ROOT / "pipeline/README.md").read_text()
    drifted = text.replace("| `resources.batch_size` | `16` |", "| `resources.batch_size` | `8` |")
    assert drifted != text
    assert docs.render(drifted) == text, "rendering restores the table from the code"


def test_docstrings_come_from_the_field_and_its_base_classes():
    from pipeline.config import RoutingConfig

    found = docs.field_docs(RoutingConfig)
    assert found["k"].startswith("Number of adapters mixed per prompt")  # actors.options.RoutingConfig
    assert "calibration" in found and found["calibration"]  # pipeline.config.RoutingConfig's own
