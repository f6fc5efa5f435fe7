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
    ("routing", {"k": 0}, r"routing\.k: must be an integer >= 1 .*; got 0"),
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
    ("generation", {"generate_step_slots": -1}, r"generation\.generate_step_slots: must be a number >= 0; got -1\.0"),
    ("generation", {"generate_step_slots": "high"}, r"generation\.generate_step_slots: expected a number; got 'high'"),
    ("generation", {"probe_bucket_overhead": float("nan")}, r"generation\.probe_bucket_overhead: must be a number"),
    ("generation", {"max_prompt_tokens": 0}, r"generation\.max_prompt_tokens: must be an integer >= 1"),
    ("adapters", {"path": "a", "max_resident": 0}, r"adapters\.max_resident=0: must be >= 1 adapter"),
    ("adapters", {"path": "a", "max_resident": "lots"}, r"adapters\.max_resident='lots': not a number of "
                                                       r"adapters nor a size; write e\.g\. 32, '512MiB'"),
    ("adapters", {"path": "a", "max_resident": 2.5}, r"adapters\.max_resident: expected int or str; got 2\.5"),
    ("adapters", {"path": "a", "max_resident": "auto"}, None),
    ("resources", {"memory_headroom": 1.0}, r"resources\.memory_headroom: must be >= 0 and < 1 .*; got 1\.0"),
    ("routing", {"grouping": False}, None),  # an earlier version's place and key: read and ignored
    ("generation", {"max_groups": 0, "time_groups": "yes"}, None),  # retired keys are not checked
])
def test_bad_values_are_refused_naming_the_key(section, values, message):
    if message is None:
        config_from_dict(with_(section, **values))
        return
    with pytest.raises(ConfigError, match=message):
        config_from_dict(with_(section, **values))


def test_a_residency_bound_below_k_is_refused_before_any_work():
    data = {**BASE, "adapters": {"path": "a", "max_resident": 3}, "routing": {"k": 4}}
    with pytest.raises(ConfigError, match=r"adapters\.max_resident: 3 adapters cannot hold one prompt's "
                                          r"routing\.k=4 selected adapters at once; set it to at least 4"):
        config_from_dict(data)
    assert config_from_dict({**data, "routing": {"k": 3}}).adapters.max_resident == 3


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


def test_job_sections_are_the_actor_options_and_the_paper_preset():
    from actors import options
    from pipeline.config import PAPER_ROUTING

    config = config_from_dict(BASE)
    assert isinstance(config.routing, options.RoutingConfig) and isinstance(config.generation, options.GenerationConfig)
    assert config.routing.actor_options() == options.RoutingConfig(), "the same defaults: one definition"
    assert config.generation.actor_options() == options.GenerationConfig()
    assert config.routing.calibration == "input"
    assert {k: v for k, v in PAPER_ROUTING.items() if k != "calibration"} == options.PAPER_ROUTING
    paper = config_from_dict(with_("routing", **PAPER_ROUTING)).routing
    assert (paper.probe_layers, paper.probe_module, paper.calibration_score, paper.k) == (-1, "q_proj", "raw", 20)
    old = config_from_dict(with_("routing", probe_layer=-2, calibration_score="raw", calibration="input"))
    assert old.routing.probe_layers == -2, "the single-block key of earlier versions is still read"
    assert old.routing.calibration is None, "raw scores read no statistics"
    listed = config_from_dict(with_("routing", probe_layers=[-4, -3, -2, -1])).routing.probe_layers
    assert listed == (-4, -3, -2, -1)


def test_every_engine_option_is_a_job_key_and_reaches_the_predictor():
    from actors import options

    values = {"max_new_tokens": 7, "stop_at_newline": True, "stop_strings": ["END"], "overlong": "error",
              "max_prompt_tokens": 99, "probe_bucket_overhead": float("inf"), "generate_step_slots": 0.0,
              "ordering": "input"}
    assert set(values) == set(options.field_names(options.GenerationConfig)), "a new option needs a case here"
    routing = {"k": 4, "signal": "entropy", "probe_layers": [0, -1], "probe_module": "v_proj",
               "probe_input": "module_input", "calibration_score": "ratio", "min_confidence": 0.5,
               "uncertain_below": 1.5, "uncertain_k": 6}
    assert set(routing) == set(options.field_names(options.RoutingConfig))
    config = config_from_dict({**BASE, "adapters": {"path": "a", "max_resident": "20GiB"},
                               "generation": values, "routing": routing})
    got = config.predictor_options()
    assert type(got["generation"]) is options.GenerationConfig and type(got["routing"]) is options.RoutingConfig
    assert got["generation"] == options.GenerationConfig(**{**values, "stop_strings": ("END",)})
    assert got["routing"] == options.RoutingConfig(**{**routing, "probe_layers": (0, -1)})
    assert got["max_resident"] == "20GiB" and got["batch_size"] == config.resources.batch_size
    assert got["memory_headroom"] == 0.1 and got["gpus"] == 1
    spread = config_from_dict({**BASE, "resources": {"gpus_per_actor": 2}}).predictor_options()
    assert spread["gpus"] == 2  # a whole number of GPUs above 1: the model spread over them
    with pytest.raises(ConfigError, match="resources.gpus_per_actor"):
        config_from_dict({**BASE, "resources": {"gpus_per_actor": 1.5}})
    assert config_from_dict(with_("resources", memory_headroom=0.4)).predictor_options()["memory_headroom"] == 0.4
    assert config_from_dict(with_("adapters", path="a", max_resident=4)).predictor_options()["max_resident"] == 4
    assert config_from_dict(BASE).predictor_options()["max_resident"] == "auto"  # the whole pool on a CPU


def test_grouping_keys_of_earlier_versions_are_read_and_ignored(caplog):
    from actors import options

    plain = config_from_dict(BASE)
    values = {"grouping": False, "max_groups": 3, "group_overhead": 2.5, "decode_union_cost": 0.0,
              "time_groups": True}
    assert set(values) == set(options.RETIRED)
    with caplog.at_level("WARNING"):
        old = config_from_dict(with_("generation", **values))
    assert old == plain and config_hash(old) == config_hash(plain)
    assert "generation.max_groups no longer changes anything" in caplog.text
    moved = config_from_dict(with_("routing", grouping=False, max_groups=2))  # an earlier place of two of them
    assert moved == plain and not hasattr(moved.routing, "grouping") and not hasattr(moved.generation, "grouping")
    with pytest.raises(ConfigError, match=r"^routing\.max_groups: now generation\.max_groups, which is set too, "
                                          r"to 4; keep only generation\.max_groups"):
        config_from_dict({**BASE, "routing": {"max_groups": 2}, "generation": {"max_groups": 4}})
    assert load_config(None, {**{f"{k}.{f}": v for k, fs in BASE.items() for f, v in fs.items()},
                              "routing.grouping": False}) == plain


def test_job_hash_covers_results_not_resources():
    base = config_from_dict(BASE)
    assert config_hash(base) == config_hash(config_from_dict(with_("resources", actors=8, batch_size=4)))
    assert config_hash(base) == config_hash(config_from_dict(with_("output", overwrite=True)))
    assert config_hash(base) != config_hash(config_from_dict(with_("routing", k=3)))
    assert config_hash(base) != config_hash(config_from_dict(with_("input", uri="other")))
    assert config_hash(base) == config_hash(config_from_dict(with_("generation", generate_step_slots=2.0))), \
        "how rows are batched never changes a result"
    assert config_hash(base) == config_hash(config_from_dict(with_("adapters", path="a", max_resident=8))), \
        "which adapters are resident never changes a result"


# Keys of the result sections that are not hashed: each only decides how rows are batched or held. A key added to a section must be added to HASHED_KEYS or here (and to the resume test).
NOT_HASHED = {"adapters.max_resident", "generation.probe_bucket_overhead", "generation.generate_step_slots",
              "generation.ordering"}


def test_hashed_keys_are_one_list_of_every_result_key():
    import dataclasses

    from pipeline.config import AdaptersConfig, GenerationConfig, InputConfig, ModelConfig, RoutingConfig
    from pipeline.config_io import HASHED_KEYS

    every = {f"{cls.section}.{f.name}" for cls in (ModelConfig, AdaptersConfig, RoutingConfig, GenerationConfig,
                                                   InputConfig) for f in dataclasses.fields(cls)}
    assert len(set(HASHED_KEYS)) == len(HASHED_KEYS)
    assert set(HASHED_KEYS) | NOT_HASHED == every and not set(HASHED_KEYS) & NOT_HASHED
    base = config_from_dict(BASE)
    for key in HASHED_KEYS:  # each listed key is hashed
        section, name = key.split(".")
        value = {"model.dtype": "float16", "model.device": "cuda", "routing.calibration": "reference",
                 "routing.probe_layers": [0], "routing.probe_module": "q_proj", "routing.k": 2,
                 "routing.signal": "entropy", "routing.probe_input": "module_input",
                 "routing.calibration_score": "ratio", "generation.stop_strings": ["###"],
                 "generation.overlong": "error", "generation.stop_at_newline": True,
                 "generation.max_prompt_tokens": 9, "input.id_column": "key", "input.passthrough": ["task"]
                 }.get(key, "other" if isinstance(getattr(getattr(base, section), name), str) else 7)
        assert config_hash(base) != config_hash(config_from_dict(with_(section, **{name: value}))), key


def test_hash_sees_places_module_sets_and_resolved_auto(tmp_path):
    from pipeline.config import ModelConfig
    from pipeline.placement import resolve_placement

    base = config_from_dict(with_("input", uri=str(tmp_path / "in")))
    for uri in (f"{tmp_path}/in/", f"{tmp_path}/x/../in", f"{tmp_path}//in", f"{tmp_path}/./in"):
        assert config_hash(base) == config_hash(config_from_dict(with_("input", uri=uri))), uri
    s3 = config_from_dict(with_("input", uri="s3://b/p/in"))
    for uri in ("s3://b/p/in/", "s3://b/p//in", "s3://b/p/x/../in", "s3://b/./p/in"):
        assert config_hash(s3) == config_hash(config_from_dict(with_("input", uri=uri))), uri
    assert config_hash(s3) != config_hash(config_from_dict(with_("input", uri="s3://b/p/in2")))
    two = config_from_dict(with_("routing", probe_module=["v_proj", "q_proj"]))
    assert two.routing.probe_module == ("q_proj", "v_proj"), "the router sees one order whatever is written"
    assert config_hash(two) == config_hash(config_from_dict(with_("routing", probe_module=["q_proj", "v_proj"])))
    assert config_hash(config_from_dict(with_("routing", probe_module="q_proj"))) == \
        config_hash(config_from_dict(with_("routing", probe_module=["q_proj"])))
    with pytest.raises(ConfigError, match=r"routing\.probe_module: lists a module twice"):
        config_from_dict(with_("routing", probe_module=["q_proj", "q_proj"]))
    cpu = with_("resources", gpus_per_actor=0)
    auto = config_from_dict(cpu)
    assert config_hash(auto) == config_hash(config_from_dict({**cpu, "model": {**cpu["model"], "dtype": "float32",
                                                                                "device": "cpu"}}))
    gpu = with_("resources", gpus_per_actor=1)
    assert config_hash(config_from_dict(gpu)) == config_hash(config_from_dict(
        {**gpu, "model": {**gpu["model"], "dtype": "bfloat16", "device": "cuda"}}))
    assert config_hash(config_from_dict(gpu)) != config_hash(auto)
    unset = config_from_dict(BASE)  # unset gpus_per_actor: auto depends on the cluster, asked only then
    assert resolve_placement(unset).model.device == "auto"
    assert resolve_placement(unset, lambda: 0.0).model == ModelConfig(path="m", dtype="float32", device="cpu")
    placed = resolve_placement(unset, lambda: 2.0)
    assert (placed.model.dtype, placed.model.device, placed.resources.gpus_per_actor) == ("bfloat16", "cuda", 1.0)
    explicit = config_from_dict({**BASE, "model": {**BASE["model"], "device": "cpu"}})
    assert resolve_placement(explicit, lambda: pytest.fail("not asked")).model.dtype == "float32"


def test_readme_example_configuration_is_valid():
    readme = Path(__file__).resolve().parents[2] / "README.md"
    section = readme.read_text().split("## Running jobs", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```yaml\n(.*?)```", section, re.S)
    assert blocks, "README.md 'Running jobs' has no yaml example"
    import yaml

    config = config_from_dict(yaml.safe_load(blocks[0]))
    assert config.input.prompt_column and config.output.uri.startswith("s3://")
