"""tamp-fx removes only what it created. The clean-up after a killed run removes what a marker
claims for a process of this host that is gone, and nothing else: not a path that is merely
named like a leftover (``.OUT.tmp-PID``, ``.OUT.old-PID``), not a live process's, not another
host's, and never an input of the run, whatever its name."""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from support.cli import invoke
from support.snapshot import snapshot
from tamp_fx.runtime.output import OUTPUT_MARKER, OWNER_SUFFIX, remove_stale_temporaries

#: A run writing OUT (argv[1]): "die" is SIGKILLed inside the block, "wait" waits for stdin to
#: close, "die-between" is SIGKILLed between moving the old OUT aside and renaming the new one.
_WRITER = """
import os, signal, sys
from pathlib import Path
from tamp_fx.runtime.transaction import atomic_directory
out, how = Path(sys.argv[1]), sys.argv[2]
if how == "die-between":
    replace, calls = os.replace, []
    def dying(a, b):
        calls.append(a)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        replace(a, b)
    os.replace = dying
with atomic_directory(out, overwrite=True) as tmp:
    (tmp / "half-written").write_text("...")
    if how == "die":
        os.kill(os.getpid(), signal.SIGKILL)
    print("ready", flush=True)
    if how == "wait":
        sys.stdin.read()
"""


def _writer(out: Path, how: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _WRITER, str(out), how], text=True, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


def _killed(out: Path, how: str = "die") -> None:
    writer = _writer(out, how)
    _, stderr = writer.communicate(timeout=60)
    assert writer.returncode == -signal.SIGKILL, stderr


def _markers(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.*{OWNER_SUFFIX}"))


def _claimed(out: Path) -> list[Path]:
    """What runs left beside ``out``: every ``.OUT.tmp-*`` / ``.OUT.old-*`` path but the markers."""
    return sorted(p for kind in ("tmp", "old") for p in out.parent.glob(f".{out.name}.{kind}-*")
                  if not p.name.endswith(OWNER_SUFFIX))


def _dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_what_a_dead_process_claims_is_removed_with_its_marker(tmp_path):
    out = tmp_path / "p"
    _killed(out)
    (left,), (marker,) = _claimed(out), _markers(out)
    assert (left / "half-written").is_file() and json.loads(marker.read_text())["pid"] > 0
    remove_stale_temporaries(out)
    assert list(tmp_path.iterdir()) == []


def test_what_a_live_process_claims_is_kept_until_it_is_gone(tmp_path):
    out = tmp_path / "p"
    writer = _writer(out, "wait")
    try:
        assert writer.stdout.readline() == "ready\n", writer.stderr.read()
        before = snapshot(tmp_path)
        assert len(_claimed(out)) == 1 and len(_markers(out)) == 1
        remove_stale_temporaries(out)
        assert snapshot(tmp_path) == before
    finally:
        writer.kill()
        writer.communicate(timeout=60)
    remove_stale_temporaries(out)
    assert list(tmp_path.iterdir()) == []


def test_names_alone_claim_nothing(tmp_path):
    """Paths named like leftovers of a dead process, without a marker or with one that is not
    tamp-fx's, are kept; so is what another host's process claims (its pid means nothing here)."""
    out, dead = tmp_path / "p", _dead_pid()
    out.mkdir()                                                   # a backup may go once OUT exists again
    (tmp_path / f".p.tmp-{dead}").mkdir()
    (tmp_path / f".p.tmp-{dead}" / "model.safetensors").write_bytes(b"weights")
    (tmp_path / f".p.tmp-{dead}-0a1b").write_text("a file")
    (tmp_path / f".p.old-{dead}").write_text("calibration text")
    (tmp_path / f".p.old-{dead}-0a1b-previous").mkdir()
    (tmp_path / f".p.old-{dead}-0a1b{OWNER_SUFFIX}").write_text("not a marker")
    (tmp_path / f".p.tmp-{dead}-0a1b-half").mkdir()
    (tmp_path / f".p.tmp-{dead}-0a1b{OWNER_SUFFIX}").write_text(json.dumps({"pid": dead, "token": "0a1b"}))  # no host
    elsewhere = tmp_path / "q"
    _killed(elsewhere)
    (marker,) = _markers(elsewhere)
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "host": "another-host"}))
    before = snapshot(tmp_path)
    remove_stale_temporaries(out)
    remove_stale_temporaries(elsewhere)
    assert snapshot(tmp_path) == before


def test_the_backup_of_a_replaced_output_is_kept_while_it_is_the_only_copy(tmp_path):
    out = tmp_path / "p"
    out.mkdir()
    (out / OUTPUT_MARKER).write_text("")
    (out / "previous").write_text("the previous output")
    _killed(out, "die-between")                                  # OUT moved aside, the new one not in place
    assert not out.exists()
    remove_stale_temporaries(out)
    (backup,) = [p for p in _claimed(out) if ".p.old-" in p.name]
    assert _claimed(out) == [backup] and (backup / "previous").read_text() == "the previous output"
    out.mkdir()                                                  # once OUT exists again, the backup goes
    remove_stale_temporaries(out)
    assert [p.name for p in tmp_path.iterdir()] == ["p"]


def _text(path: Path) -> Path:
    path.write_text("the quick brown fox jumps over the lazy dog. " * 60)
    return path


def _plan_args(model: Path, calib: Path, out: Path, *extra) -> list:
    return ["plan", model, "--calib", calib, "--out", out, "--nsamples", 2, "--seqlen", 16, "-q", *extra]


def test_inputs_named_like_leftovers_survive_plan_and_apply(tmp_path, llama):
    """A model named ``.OUT.tmp-PID`` and a calibration file named ``.OUT.old-PID`` of a dead
    PID beside --out, then a model and a plan named so beside apply's --out: all byte-identical
    after runs that write and replace --out."""
    dead = _dead_pid()
    model = Path(shutil.copytree(llama, tmp_path / f".p.tmp-{dead}"))
    calib = _text(tmp_path / f".p.old-{dead}")
    inputs = snapshot(model, calib)
    for extra in ([], ["--overwrite"]):                          # the second replaces --out
        result = invoke(_plan_args(model, calib, tmp_path / "p", *extra))
        assert result.exit_code == 0, result.output
        assert snapshot(model, calib) == inputs
    apply_model = Path(shutil.copytree(llama, tmp_path / f".m.tmp-{dead}"))
    plan = Path(shutil.copytree(tmp_path / "p", tmp_path / f".m.old-{dead}"))
    inputs = snapshot(apply_model, plan)
    for extra in ([], ["--overwrite"]):
        result = invoke(["apply", apply_model, plan, "--out", tmp_path / "m", "-q", *extra])
        assert result.exit_code == 0, result.output
        assert snapshot(apply_model, plan) == inputs
    assert (tmp_path / "m" / "config.json").is_file()


def test_an_input_inside_what_a_dead_run_claims_is_kept(tmp_path, llama):
    """Even a path a dead run's marker claims is never removed when it is an input of the run;
    the claim is dropped (an input is the user's from then on), the rest of it removed."""
    out = tmp_path / "p"
    _killed(out)
    (left,), (marker,) = _claimed(out), _markers(out)
    model = Path(shutil.copytree(llama, tmp_path / (marker.name.removesuffix(OWNER_SUFFIX) + "-model")))
    calib = _text(tmp_path / "calib.txt")
    inputs = snapshot(model, calib)
    result = invoke(_plan_args(model, calib, out))
    assert result.exit_code == 0, result.output
    assert snapshot(model, calib) == inputs
    assert not left.exists() and not marker.exists()


@pytest.mark.parametrize("how", ["die", "die-between"])
def test_a_killed_run_leaves_only_what_its_markers_claim(tmp_path, how):
    out = tmp_path / "p"
    if how == "die-between":
        out.mkdir()
        (out / OUTPUT_MARKER).write_text("")
    _killed(out, how)
    claims = [m.name.removesuffix(OWNER_SUFFIX) + "-" for m in _markers(out)]
    left = [p.name for p in tmp_path.iterdir() if not p.name.endswith(OWNER_SUFFIX)]
    assert left and all(name.startswith(tuple(claims)) for name in left), (left, claims)
