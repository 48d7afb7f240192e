"""What a new user reads first: `tamp-fx --version`, every command's --help fitting 80 columns
(no flag shown as taking a <bool>), and the same option names for the same things in every command."""
from __future__ import annotations

import re
from importlib.metadata import version

import pytest
import typer
from typer.testing import CliRunner

import tamp_fx
from tamp_fx.cli.main import app

runner = CliRunner()
GROUP = typer.main.get_command(app)
COMMANDS = sorted(GROUP.commands)
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")

#: one name (and short form) for one thing, in every command that takes it
CANONICAL = [{"--verbose", "-v"}, {"--quiet", "-q"}, {"--json"}, {"--out"}, {"--overwrite"}, {"--log-format"},
             {"--allow-nonfinite"}]


def _help(*command: str) -> str:
    result = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    return ANSI.sub("", result.stdout)


def _options(command: str) -> set[str]:
    return {opt for param in GROUP.commands[command].params for opt in (*param.opts, *param.secondary_opts)}


def test_version_is_the_installed_distributions():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0, result.output
    assert result.stdout == f"tamp-fx {version('tamp-fx')}\n"
    assert version("tamp-fx") == tamp_fx.__version__


@pytest.mark.parametrize("command", ["", *COMMANDS])
def test_help_fits_80_columns_and_shows_no_bool_type(command):
    text = _help(*filter(None, [command]))
    too_long = [line for line in text.splitlines() if len(line) > 80]
    assert not too_long, "\n".join(too_long)
    assert "<bool>" not in text and "BOOLEAN" not in text
    assert not re.search(r"\bissue\s*#?\d", text, re.IGNORECASE)
    assert "--help" in text


def test_plan_help_is_short():
    lines = _help("plan").splitlines()
    assert len(lines) < 100, len(lines)                      # it was 178 at 80 columns
    assert any("--method" in line and "NAME" in line for line in lines)


def test_the_same_things_have_the_same_option_names_in_every_command():
    for command in COMMANDS:
        for param in GROUP.commands[command].params:
            opts = {*param.opts, *param.secondary_opts}
            for names in CANONICAL:
                if opts & names:
                    assert opts == names, f"{command} {param.name}: {sorted(opts)} instead of {sorted(names)}"
        assert {"--verbose", "-v"} <= _options(command), command
        if "--out" in _options(command) and command != "demo":        # demo replaces its own outputs
            assert "--overwrite" in _options(command), command
    for command in ("plan", "apply", "export", "eval", "demo", "inspect"):
        assert "-q" in _options(command), command
    for command in ("plan", "apply", "export", "demo"):
        assert "--log-format" in _options(command), command
    for command in ("inspect", "diff", "eval"):
        assert "--json" in _options(command), command
