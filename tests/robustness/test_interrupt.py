"""Ctrl-C at any moment of any command (while Python imports typer or torch, while the model
loads, while layers are pruned, while the output is being written) prints one line,
"interrupted: nothing was written", exits 130 and leaves nothing behind."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support.snapshot import snapshot

_INTERRUPT_AT_IMPORT = """
import os, signal, sys
class Interrupt:                                  # Ctrl-C the moment {target} starts to import
    def find_spec(self, name, path=None, target=None):
        if name == {target!r}:
            sys.meta_path.remove(self)
            os.kill(os.getpid(), {signal})
        return None
from tamp_fx.cli import run
sys.meta_path.insert(0, Interrupt())
sys.argv = ["tamp-fx", *{args!r}]
sys.exit(run())
"""

_INTERRUPT_AT_CALL = """
import importlib, os, signal, sys
module, name = {target!r}.rsplit(".", 1)         # Ctrl-C the moment {target} is called
module = importlib.import_module(module)
original = getattr(module, name)
def interrupted(*args, **kwargs):
    os.kill(os.getpid(), {signal})
    return original(*args, **kwargs)
setattr(module, name, interrupted)
from tamp_fx.cli import run
sys.argv = ["tamp-fx", *{args!r}]
sys.exit(run())
"""


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}


def _interrupted_cleanly(process: subprocess.Popen, before: dict, *roots: Path,
                         signum: int = signal.SIGINT) -> None:
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signum, stderr
    assert stderr.strip() == "error: interrupted: nothing was written", stderr
    assert stdout == ""
    assert snapshot(*roots) == before, "something was written"


def _run(script: str, target: str, args: list[str], *roots: Path, signum: int = signal.SIGINT) -> None:
    before = snapshot(*roots)
    code = script.format(target=target, args=[str(a) for a in args], signal=int(signum))
    process = subprocess.Popen([sys.executable, "-c", code], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    _interrupted_cleanly(process, before, *roots, signum=signum)


def _commands(tmp_path: Path, llama: Path, plan: Path) -> dict[str, list]:
    out = tmp_path / "out"
    return {"plan": ["plan", llama, "--calib", llama / "calib.jsonl", "--out", out, "--nsamples", "4", "-q"],
            "apply": ["apply", llama, plan, "--out", out, "-q"],
            "inspect": ["inspect", plan],
            "convert": ["convert", tmp_path / "missing.gguf", "--out", out],
            "eval": ["eval", llama, "--text", llama / "calib.jsonl", "--no-vqa", "-q"],
            "fixture": ["fixture", "--out", out],
            "demo": ["demo", "--out", out, "-q"]}


@pytest.mark.parametrize("target", ["typer", "torch"])
def test_every_command_while_importing(target, tmp_path, llama, saved_plan):
    for args in _commands(tmp_path, llama, saved_plan).values():
        _run(_INTERRUPT_AT_IMPORT, target, args, tmp_path, llama, saved_plan)


@pytest.mark.parametrize("target", ["tamp_fx.pipeline.plan.meta_model", "tamp_fx.pipeline.plan.prune_layers", "tamp_fx.artifact.plan.save_tensors"])
def test_plan_at_every_stage(target, tmp_path, llama, saved_plan):
    _run(_INTERRUPT_AT_CALL, target, _commands(tmp_path, llama, saved_plan)["plan"], tmp_path, llama)


def test_sigterm_is_handled_like_ctrl_c(tmp_path, llama, saved_plan):
    _run(_INTERRUPT_AT_IMPORT, "torch", _commands(tmp_path, llama, saved_plan)["plan"], tmp_path, llama,
         signum=signal.SIGTERM)


def test_apply_while_writing_shards(tmp_path, llama, saved_plan):
    _run(_INTERRUPT_AT_CALL, "tamp_fx.write.apply.save_tensors", _commands(tmp_path, llama, saved_plan)["apply"],
         tmp_path, llama, saved_plan)


def test_a_real_ctrl_c_one_second_in(tmp_path, llama):
    before = snapshot(tmp_path, llama)
    process = subprocess.Popen([sys.executable, "-c", "import sys; from tamp_fx.cli import run; sys.argv[0] = 'tamp-fx';"
                                " sys.exit(run())", *map(str, _commands(tmp_path, llama, tmp_path)["plan"])],
                               env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)
    process.send_signal(signal.SIGINT)
    _interrupted_cleanly(process, before, tmp_path, llama)


_STOPPED_WHILE_LEAVING = """
import os, signal, sys, types
import tamp_fx.cli as cli
from tamp_fx.runtime.launch import Launch
def command():                                    # the command ends with status 1 (another rank failed)
    signal.signal(signal.SIGTERM, cli._interrupt)
    return 1
def leave(code):                                  # torchrun's SIGTERM while this rank leaves its process group
    os.kill(os.getpid(), signal.SIGTERM)
    sys.exit(code)
cli.run, cli.lenient = command, lambda: Launch(rank=1, size=2)
sys.modules["tamp_fx.runtime.distributed"] = types.SimpleNamespace(end_process=leave)
cli.main()
"""


def test_a_rank_stopped_by_torchrun_while_it_leaves_exits_quietly():
    """Once one rank fails torchrun sends SIGTERM to the others, which may be past their command,
    leaving the process group: that ends them with the command's status, no traceback."""
    r = subprocess.run([sys.executable, "-c", _STOPPED_WHILE_LEAVING], capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stdout, r.stderr) == (1, "", "")
