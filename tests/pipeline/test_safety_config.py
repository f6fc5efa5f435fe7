"""Malformed configuration values and input columns that the output would silently replace are
refused with a message that names the file, section or key."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import (
    AdaptersConfig, ConfigError, GenerationConfig, InputConfig, InputError, JobConfig, ModelConfig, OutputConfig,
    RoutingConfig, config_from_dict, load_config,
)
from pipeline.guards import check_input_schema

BASE = {"model": {"path": "m"}, "adapters": {"path": "a"}, "input": {"uri": "i"}, "output": {"uri": "o"}}


@pytest.mark.parametrize("section, yaml_value, message", [
    ("model", "/x", r"job\.yaml: model: expected a mapping of keys to values; got '/x'"),
    ("routing", "[1, 2]", r"job\.yaml: routing: expected a mapping of keys to values; got \[1, 2\]"),
    ("input", "{uri: i, id_column: ''}", r"job\.yaml: input\.id_column: is empty"),
    ("routing", "{k: [3]}", r"job\.yaml: routing\.k: expected an integer; got \[3\]"),
    ("generation", "{stop_strings: ['']}",
     r"job\.yaml: generation\.stop_strings: holds an empty string .*; got \('',\)"),
    ("routing", "{probe_module: [q_proj, '']}",
     r"job\.yaml: routing\.probe_module: holds an empty name .*; got \('q_proj', ''\)"),
    ("1", "{k: 2}", r"job\.yaml: 1: unknown section"),
])
@pytest.mark.parametrize("overrides", [{}, {"generation.max_new_tokens": 4}])
def test_malformed_values_in_a_file_name_the_file_and_key(tmp_path, section, yaml_value, message, overrides):
    path = tmp_path / "job.yaml"
    lines = [f"{name}: {{{key}: {value}}}" for name, fields in BASE.items() for key, value in fields.items()
             if name != section]
    path.write_text("\n".join(lines + [f"{section}: {yaml_value}"]) + "\n")
    with pytest.raises(ConfigError, match=message):
        load_config(path, overrides)


def test_actor_option_refusals_are_found_when_a_section_is_built():
    # The job's sections are the actors' option classes: a value the actors refuse is refused when
    # the section is built (in Python too, not only from YAML), naming the section and key.
    sections = {name: cls(**BASE[name]) for name, cls in
                (("model", ModelConfig), ("adapters", AdaptersConfig), ("input", InputConfig), ("output", OutputConfig))}
    assert JobConfig(**sections, routing=RoutingConfig(k=3)).predictor_options()["routing"].k == 3
    with pytest.raises(ConfigError, match=r"^routing\.k: must be an integer >= 1 .*; got 2\.5"):
        RoutingConfig(k=2.5)
    with pytest.raises(ConfigError, match=r"^generation\.stop_at_newline: must be true or false; got 'yes'"):
        GenerationConfig(stop_at_newline="yes")
    with pytest.raises(ConfigError, match=r"^adapters\.max_resident='20 apples': not a number of adapters"):
        AdaptersConfig(path="a", max_resident="20 apples")


@pytest.mark.parametrize("input_section, message", [
    ({"prompt_column": "id"}, r"input\.prompt_column: 'id' clashes with the output column"),
    ({"id_column": "prompt"}, r"input\.id_column: 'prompt' is also input\.prompt_column"),
    ({"passthrough": ["_logo_input_error"]}, r"input\.passthrough: '_logo_input_error': names starting with "
                                            r"'_logo_' are kept for the dataflow"),
    ({"prompt_column": "_logo_x"}, r"input\.prompt_column: '_logo_x'"),
])
def test_columns_the_output_would_replace_are_refused(input_section, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict({**BASE, "input": {"uri": "i", **input_section}})


def test_an_input_column_named_id_needs_id_column(tmp_path):
    pq.write_table(pa.table({"id": ["a", "b"], "prompt": ["x", "y"], "_logo_input_error": ["p", "q"]}),
                   tmp_path / "in.parquet")
    names = pq.read_schema(tmp_path / "in.parquet").names
    unset = config_from_dict({**BASE, "input": {"uri": str(tmp_path)}}).input
    with pytest.raises(InputError, match=r"in\.parquet: has a column 'id', but input\.id_column is not set.*"
                                         r"set input\.id_column: id"):
        check_input_schema(names, unset, str(tmp_path / "in.parquet"))
    check_input_schema(names, config_from_dict({**BASE, "input": {"uri": "i", "id_column": "id"}}).input, "in")
    renamed = pa.table({"id": ["a"]}).rename_columns(["row_id"]).schema.names + ["prompt"]
    check_input_schema(renamed, unset, "in")  # no `id` column: derived ids replace nothing
