"""Every sub-command's help: quick (no heavy import behind it), every option documented, defaults shown."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.cli import COMMANDS, build_parser, main

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "ray", "transformers", "peft", "datasets", "pyarrow", "matplotlib", "boto3")


def test_declaring_every_command_imports_nothing_heavy():
    """What `--help` needs (every command's options) loads none of the heavy packages: help stays fast."""
    code = ("import sys, json; from jobs.cli import build_parser; build_parser(load_all=True); "
            f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []


def _commands():
    parser = build_parser(load_all=True)
    (sub,) = [a for a in parser._actions if a.dest == "command"]
    return sub.choices


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_option_is_documented_and_shows_its_default(name, capsys):
    command = _commands()[name]
    options = [a for a in command._actions if a.option_strings and a.dest != "help"]
    for action in options:
        assert action.help and len(action.help) > 8, f"{name} {action.option_strings[0]}: no help"
    text = command.format_help()
    assert text.count("(default:") >= len([a for a in options if a.default is not None or a.nargs != 0])
    with pytest.raises(SystemExit) as exit_:
        main([name, "--help"])
    assert exit_.value.code == 0
    assert f"usage: logo-batch {name}" in capsys.readouterr().out


def test_eval_default_matches_the_benchmark_configuration():
    from jobs.demo.eval_command import PER_TASK
    from jobs.demo.evaluate import EvalConfig

    assert PER_TASK == EvalConfig().per_task


@pytest.mark.parametrize("name", list(COMMANDS))
def test_help_shows_real_defaults_never_none(name):
    """An option left out means something (the file's value, the key's default, an environment
    variable): `--help` says what, never `(default: None)`."""
    text = _commands()[name].format_help()
    assert "(default: None)" not in text.replace("\n", " ").replace("  ", " ")
    assert "default: None" not in " ".join(text.split())


def test_run_flags_show_the_defaults_of_their_configuration_keys():
    """The default `logo-batch run --help` shows for a flag is its key's default in pipeline/config.py."""
    import dataclasses

    from jobs.run import FLAGS
    from pipeline import config

    sections = {cls.section: cls for cls in vars(config).values()
                if isinstance(cls, type) and dataclasses.is_dataclass(cls) and hasattr(cls, "section")}
    for flag, (key, _, _, shown) in FLAGS.items():
        section, name = key.split(".")
        default = {f.name: f.default for f in dataclasses.fields(sections[section])}[name]
        if default is dataclasses.MISSING:
            assert "required" in shown, flag
        elif default is None:
            assert shown and shown.lower() != "none", f"--{flag}: say what None means"
        else:
            assert shown == str(default), f"--{flag} shows {shown!r}, {key} defaults to {default!r}"


def test_bigbench_eval_default_matches_its_configuration():
    from jobs.demo.eval_command import BIGBENCH_PER_TASK
    from jobs.demo.evaluate_bigbench import BigbenchEvalConfig

    assert BIGBENCH_PER_TASK == BigbenchEvalConfig().per_task
