"""The user's guide holds only commands that work: every `logo-batch` line of a shell block in
README.md (and in the package READMEs) parses with the real parser; the test command is the one
`.ci/run` runs; the option tables match the code."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from jobs.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
GUIDES = ["README.md", "actors/README.md", "pipeline/README.md", "jobs/README.md", "infra/README.md"]


def commands(path: Path) -> list[str]:
    """The `logo-batch ...` command lines of a Markdown file's bash blocks, continuations joined."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", path.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            if line.startswith("logo-batch "):
                found.append(line)
    return found


def test_the_guide_has_its_commands():
    readme = commands(ROOT / "README.md")
    for needed in ("logo-batch demo", "logo-batch run", "logo-batch validate", "logo-batch submit",
                   "logo-batch nightly", "logo-batch report --compare"):
        assert any(c.startswith(needed) for c in readme), needed
    assert len((ROOT / "README.md").read_text().splitlines()) <= 260, "the user's guide stays short"


@pytest.mark.parametrize("guide", GUIDES)
def test_every_logo_batch_command_line_parses(guide):
    parser = build_parser(load_all=True)
    lines = commands(ROOT / guide)
    if guide == "README.md":
        assert len(lines) >= 10
    for line in lines:
        argv = shlex.split(line, comments=True)[1:]
        try:
            parser.parse_args(argv)
        except SystemExit as exit_:
            pytest.fail(f"{guide}: `{line}` does not parse (exit {exit_.code})")


def test_the_test_command_is_the_one_ci_runs():
    readme = (ROOT / "README.md").read_text()
    assert "RAY_AUTH_MODE=disabled python -m pytest -q" in readme
    assert "python -m pytest -q" in (ROOT / ".ci" / "run").read_text()


def test_the_guide_says_how_to_start_s3_and_pass_a_list():
    readme = (ROOT / "README.md").read_text()
    assert "weed mini" in readme and "create_bucket" in readme and "AWS_ACCESS_KEY_ID" in readme
    listed = [c for c in commands(ROOT / "README.md") if "--set" in c and "[" in c]
    assert listed, "an example of --set with a list"
    from pipeline.config_io import parse_set

    item = next(a for a in shlex.split(listed[0], comments=True) if a.startswith("input.passthrough="))
    assert parse_set([item]) == {"input.passthrough": ["task", "source"]}


def test_links_between_the_guides_resolve():
    for guide in GUIDES + ["jobs/benchmarks/results/README.md"]:
        path = ROOT / guide
        for target in re.findall(r"\]\(([^)#]+?\.md)(?:#[^)]*)?\)", path.read_text()):
            if "://" not in target:
                assert (path.parent / target).resolve().is_file(), f"{guide}: broken link {target}"


def test_the_license_is_an_spdx_expression():
    """setuptools deprecates `project.license` as a table (three warnings on every set-up)."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["license"] == "Apache-2.0"
    assert any(r.startswith("setuptools>=77") for r in project["build-system"]["requires"])
