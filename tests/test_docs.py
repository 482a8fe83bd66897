"""Docs stay true: every command is documented, the README's commands are the ones CI runs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from influence_cli import cli

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _commands() -> list[str]:
    import typer.main

    return sorted(typer.main.get_command(cli.app).commands)


@pytest.mark.parametrize("name", _commands())
def test_every_command_has_help_and_is_in_the_readme(name, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([name, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert ("--config" in out or name == "diff") and len(out.splitlines()) > 3
    assert f"infl {name}" in README


def test_readme_starts_with_the_two_commands_and_ci_runs_the_second():
    blocks = re.findall(r"```bash\n(.*?)\n```", README, flags=re.S)
    install_run, install_test = blocks[0].strip(), blocks[1].strip()
    assert "pip install" in install_run and "infl selfcheck -c configs/digits.yaml" in install_run
    assert "pip install" in install_test and "pytest" in install_test
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert install_test in ci


def test_spec_commands_exist():
    assert {"selfcheck", "rank", "train", "check"} <= set(_commands())
