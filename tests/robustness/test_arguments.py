"""Argument values out of range are refused where they are parsed, as one usage-error line
(exit status 2), before any work; so are bad values of the variables torchrun sets (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_PORT), naming the variable and its value."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from support.cli import fails_cleanly
from tamp_fx.errors import TampError


def _commands(tmp_path) -> dict[str, list]:
    model, text, out = tmp_path / "model", tmp_path / "text.txt", tmp_path / "out"
    return {"plan": ["plan", model, "--calib", text, "--out", out, "-q"],
            "eval": ["eval", model, "--text", text, "-q"],
            "export": ["export", model, "--calib", text, "--out", out / "m.pt2", "--calib-out", out / "c.safetensors"],
            "fixture": ["fixture", "--out", out, "--calib-out", tmp_path / "calib"]}


#: (command, option, value): every one out of its range
OUT_OF_RANGE = [
    ("plan", "--nsamples", "0"), ("plan", "--seqlen", "1"), ("plan", "--sparsity", "1"), ("plan", "--sparsity", "-0.1"),
    ("plan", "--sparsity", "nan"), ("plan", "--atv-alpha", "0"), ("plan", "--atv-alpha", "inf"),
    ("plan", "--max-sparsity-delta", "1.5"), ("plan", "--max-sparsity-delta", "-0.1"),
    ("eval", "--seqlen", "0"), ("eval", "--seqlen", "1"), ("eval", "--max-windows", "-1"), ("eval", "--max-windows", "0"),
    ("eval", "--vqa-samples", "0"),
    ("export", "--nsamples", "0"), ("export", "--seqlen", "1"),
    ("fixture", "--conversations", "0"),
]


@pytest.mark.parametrize("command, option, value", OUT_OF_RANGE)
def test_a_value_out_of_range_is_a_one_line_usage_error(tmp_path, command, option, value):
    (tmp_path / "model").mkdir()
    (tmp_path / "text.txt").write_text("some text")
    output = fails_cleanly([*_commands(tmp_path)[command], option, value], option, tmp_path / "out",
                           unchanged=[tmp_path], code=2)
    assert f"{command} --help" in output


#: environment -> what the error names
BAD_LAUNCH = {
    "RANK=x": ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x'"),
    "RANK=-1": ({"RANK": "-1"}, "RANK='-1'"),
    "empty RANK": ({"RANK": "", "WORLD_SIZE": "2"}, "RANK=''"),
    "WORLD_SIZE=0": ({"RANK": "0", "WORLD_SIZE": "0"}, "WORLD_SIZE='0'"),
    "WORLD_SIZE=two": ({"WORLD_SIZE": "two"}, "WORLD_SIZE='two'"),
    "RANK not below WORLD_SIZE": ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK=2 is not below WORLD_SIZE=2"),
    "LOCAL_RANK=abc": ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "abc"}, "LOCAL_RANK='abc'"),
    "MASTER_PORT=99999": ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "99999"}, "MASTER_PORT='99999'"),
    "MASTER_PORT=http": ({"RANK": "1", "WORLD_SIZE": "2", "MASTER_PORT": "http"}, "MASTER_PORT='http'"),
}
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")


@pytest.fixture
def launch_env(monkeypatch):
    for name in LAUNCH_VARIABLES:
        monkeypatch.delenv(name, raising=False)

    def set_env(variables: dict[str, str]) -> None:
        for name, value in variables.items():
            monkeypatch.setenv(name, value)
    return set_env


@pytest.mark.parametrize("case", BAD_LAUNCH)
def test_a_bad_launch_variable_is_one_line_naming_it(tmp_path, llama, launch_env, case):
    variables, expected = BAD_LAUNCH[case]
    launch_env(variables)
    fails_cleanly(["plan", llama, "--calib", llama / "calib.jsonl", "--out", tmp_path / "p", "-q"], expected,
                  tmp_path / "p", unchanged=[tmp_path, llama], code=2)


def test_a_bad_launch_variable_through_the_console_entry_point(tmp_path):
    """The entry point reads WORLD_SIZE again after the command (to end a torchrun process): no
    traceback there either."""
    env = {**{k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}, "WORLD_SIZE": "two"}
    r = subprocess.run([sys.executable, "-m", "tamp_fx.cli", "inspect", str(tmp_path / "plan")], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == ["error: environment variable WORLD_SIZE='two' is not a whole number 1 or "
                                             "more: unset it, or start the command with torchrun, which sets it"]
    assert r.stdout == ""


def test_the_library_names_a_bad_launch_variable_too(launch_env):
    from tamp_fx.runtime import distributed
    launch_env({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "-3"})
    with pytest.raises(TampError, match="LOCAL_RANK='-3'"):
        distributed.init_from_env()
    assert distributed.world().size == 1
