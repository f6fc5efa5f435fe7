"""Job configuration: YAML, overrides, refusals that name the key, the job hash, the README example."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pipeline import ConfigError, config_from_dict, config_hash, load_config
from pipeline.config_io import parse_set

BASE = {"model": {"path": "m"}, "adapters": {"path": "a"}, "input": {"uri": "i"}, "output": {"uri": "o"}}


def with_(section: str, **values) -> dict:
    return {**BASE, section: {**BASE.get(section, {}), **values}}


def test_unknown_key_is_refused_naming_it_and_the_known_keys():
    with pytest.raises(ConfigError, match=r"^routing\.kk: unknown key; known keys: k, signal, probe_layers, probe_module"):
        config_from_dict(with_("routing", kk=3))


def test_unknown_section_is_refused():
    with pytest.raises(ConfigError, match=r"^routng: unknown section; known sections: model, adapters"):
        config_from_dict({**BASE, "routng": {"k": 3}})


@pytest.mark.parametrize("section, values, message", [
    ("routing", {"k": "five"}, r"routing\.k: expected an integer; got 'five'"),
    ("routing", {"k": True}, r"routing\.k: expected an integer; got True"),
    ("routing", {"k": 0}, r"routing\.k: must be >= 1; got 0"),
    ("routing", {"signal": "max"}, r"routing\.signal: must be one of norm, entropy; got 'max'"),
    ("generation", {"overlong": "drop"}, r"generation\.overlong: must be one of truncate, error"),
    ("generation", {"stop_strings": "\n"}, r"generation\.stop_strings: expected a list of strings"),
    ("resources", {"cpus_per_actor": 1.5}, r"resources\.cpus_per_actor: above 1 must be a whole number"),
    ("input", {"passthrough": ["output"]}, r"input\.passthrough: 'output' clashes with the output column"),
    ("storage", {"endpoint": "127.0.0.1:8333"}, r"storage\.endpoint: must start with http:// or https://"),
    ("routing", {"probe_module": 3}, r"routing\.probe_module: expected str or a list of strings; got 3"),
    ("routing", {"calibration_score": "ratio", "calibration": None},
     r"routing\.calibration_score: 'ratio' needs routing\.calibration .* calibration_score: raw"),
    ("routing", {"probe_layers": "last"}, r"routing\.probe_layers: give a block index .* or all; got 'last'"),
    ("routing", {"probe_layers": [1, "a"]}, r"routing\.probe_layers: expected int or a list of integers or str"),
    ("routing", {"probe_layers": True}, r"routing\.probe_layers: expected int or a list of integers or str"),
    ("routing", {"calibration_min_rows": 0}, r"routing\.calibration_min_rows: must be >= 1"),
])
def test_bad_values_are_refused_naming_the_key(section, values, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(with_(section, **values))


def test_missing_required_key_and_section():
    with pytest.raises(ConfigError, match=r"^model\.path: required key is missing"):
        config_from_dict({**BASE, "model": {"dtype": "auto"}})
    with pytest.raises(ConfigError, match=r"^output: required section is missing"):
        config_from_dict({k: v for k, v in BASE.items() if k != "output"})


def test_yaml_file_with_overrides(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("model: {path: m}\nadapters: {path: a}\ninput: {uri: i, passthrough: [task]}\n"
                    "output: {uri: o}\nrouting: {k: 4}\n")
    config = load_config(path, {"routing.k": 2, **parse_set(["generation.stop_at_newline=true",
                                                              "generation.stop_strings=[END, '###']"])})
    assert config.routing.k == 2 and config.generation.stop_at_newline is True
    assert config.generation.stop_strings == ("END", "###") and config.input.passthrough == ("task",)
    assert config.resources.actors == 1  # defaults fill the rest
    modules = load_config(path, {"routing.probe_module": ["q_proj", "v_proj"]}).routing.probe_module
    assert modules == ("q_proj", "v_proj")
    with pytest.raises(ConfigError, match=r"routing\.kk: unknown key"):
        load_config(path, parse_set(["routing.kk=2"]))
    with pytest.raises(ConfigError, match="configuration file not found"):
        load_config(tmp_path / "missing.yaml")


def test_routing_defaults_equal_the_engine_defaults_and_the_paper_preset():
    from actors import RoutingConfig as EngineRouting
    from actors.router import PAPER_ROUTING as ENGINE_PAPER
    from pipeline.config import PAPER_ROUTING

    routing, engine = config_from_dict(BASE).routing, EngineRouting()
    for key in ("k", "signal", "probe_layers", "probe_module", "probe_input", "calibration_score"):
        assert getattr(routing, key) == getattr(engine, key), key
    assert routing.calibration == "input"
    assert {k: v for k, v in PAPER_ROUTING.items() if k != "calibration"} == ENGINE_PAPER
    paper = config_from_dict(with_("routing", **PAPER_ROUTING)).routing
    assert (paper.probe_layers, paper.probe_module, paper.calibration_score, paper.k) == (-1, "q_proj", "raw", 20)
    old = config_from_dict(with_("routing", probe_layer=-2, calibration_score="raw", calibration="input"))
    assert old.routing.probe_layers == -2, "the single-block key of earlier versions is still read"
    assert old.routing.calibration is None, "raw scores read no statistics"
    listed = config_from_dict(with_("routing", probe_layers=[-4, -3, -2, -1])).routing.probe_layers
    assert listed == (-4, -3, -2, -1)


def test_job_hash_covers_results_not_resources():
    base = config_from_dict(BASE)
    assert config_hash(base) == config_hash(config_from_dict(with_("resources", actors=8, batch_size=4)))
    assert config_hash(base) == config_hash(config_from_dict(with_("output", overwrite=True)))
    assert config_hash(base) != config_hash(config_from_dict(with_("routing", k=3)))
    assert config_hash(base) != config_hash(config_from_dict(with_("input", uri="other")))


def test_readme_example_configuration_is_valid():
    readme = Path(__file__).resolve().parents[2] / "README.md"
    section = readme.read_text().split("## Running jobs", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```yaml\n(.*?)```", section, re.S)
    assert blocks, "README.md 'Running jobs' has no yaml example"
    import yaml

    config = config_from_dict(yaml.safe_load(blocks[0]))
    assert config.input.prompt_column and config.output.uri.startswith("s3://")
