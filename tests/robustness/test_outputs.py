"""--out is checked before any work (an existing path, a file where a directory is needed, a
directory that cannot be written), replaced cleanly with --overwrite, and what runs killed
with SIGKILL leave beside it is removed by the next run on it."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import tamp_fx.pipeline.plan
import tamp_fx.write.apply
from support.cli import fails_cleanly, invoke
from tamp_fx.runtime.output import OUTPUT_MARKER, OWNER_SUFFIX


@pytest.fixture
def no_work(monkeypatch):
    """Loading the model is the first piece of work: a refusal must come before it."""
    def refuse(*args, **kwargs):
        raise AssertionError("work started before the output was checked")
    for name in ("load_checked", "meta_model"):                     # whole, or layer by layer
        monkeypatch.setattr(tamp_fx.pipeline.plan, name, refuse)
    for name in ("load_model", "load_checked", "check_checkpoint"):
        monkeypatch.setattr(tamp_fx.write.apply, name, refuse)


def _plan(llama, out, *extra):
    return ["plan", llama, "--calib", llama / "calib.jsonl", "--out", out, "-q", *extra]


def test_an_existing_out_is_refused_without_overwrite(tmp_path, llama, no_work):
    (tmp_path / "p").write_text("keep me")
    fails_cleanly(_plan(llama, tmp_path / "p"), "already exists", unchanged=[tmp_path, llama])


def test_out_under_a_file_is_refused(tmp_path, llama, no_work):
    (tmp_path / "f").write_text("a file")
    fails_cleanly(_plan(llama, tmp_path / "f" / "p"), "is a file", unchanged=[tmp_path, llama])
    fails_cleanly(_plan(llama, tmp_path / "f" / "a" / "b"), "is a file", unchanged=[tmp_path, llama])


def test_a_directory_for_a_pt2_file_is_refused(tmp_path, saved_plan):
    model = tmp_path / "m.pt2"
    model.write_bytes(b"refused before it is read")
    (tmp_path / "out.pt2").mkdir()
    fails_cleanly(["apply", model, saved_plan, "--out", tmp_path / "out.pt2", "--overwrite", "-q"], "is a directory",
                  unchanged=[tmp_path])


def _chattr(flag: str, path: Path) -> bool:
    try:
        return subprocess.run(["chattr", flag, str(path)], capture_output=True).returncode == 0
    except FileNotFoundError:
        return False


@pytest.fixture
def immutable(tmp_path):
    """A directory with the immutable attribute (chattr +i stops root too); skipped where it cannot be set."""
    directory = tmp_path / "frozen"
    directory.mkdir()
    (directory / "old").mkdir()
    if not _chattr("+i", directory):
        pytest.skip("chattr +i is not available here")
    yield directory
    _chattr("-i", directory)


def test_an_immutable_parent_is_refused_before_any_work(immutable, llama, no_work):
    fails_cleanly(_plan(llama, immutable / "p"), "not writable", unchanged=[immutable, llama])
    fails_cleanly(_plan(llama, immutable / "new" / "p"), "not writable", unchanged=[immutable, llama])


def test_an_immutable_out_is_refused_before_any_work(immutable, llama, no_work):
    fails_cleanly(_plan(llama, immutable, "--overwrite"), "immutable", unchanged=[immutable, llama])


@pytest.mark.skipif(os.geteuid() == 0, reason="permission bits do not stop root")
def test_a_read_only_parent_is_refused_before_any_work(tmp_path, llama, no_work):
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o555)
    try:
        fails_cleanly(_plan(llama, tmp_path / "ro" / "p"), "not writable", unchanged=[tmp_path, llama])
    finally:
        (tmp_path / "ro").chmod(0o755)


def test_overwrite_never_replaces_a_file_with_a_directory_output(tmp_path, llama, no_work):
    (tmp_path / "p").write_text("a file tamp-fx did not write")
    fails_cleanly(_plan(llama, tmp_path / "p", "--overwrite"), "is a file and tamp-fx writes a directory",
                  unchanged=[tmp_path, llama])


def test_overwrite_never_replaces_a_directory_tamp_fx_did_not_write(tmp_path, llama, no_work):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "precious.txt").write_text("months of work")
    fails_cleanly(_plan(llama, tmp_path / "data", "--overwrite"), "did not write", unchanged=[tmp_path, llama])


def test_overwrite_replaces_an_empty_directory(tmp_path, llama):
    (tmp_path / "p").mkdir()
    result = invoke(_plan(llama, tmp_path / "p", "--overwrite"))
    assert result.exit_code == 0, result.output
    assert (tmp_path / "p" / "plan.json").is_file()


def test_overwrite_replaces_a_tamp_fx_output_and_leaves_nothing_beside_it(tmp_path, llama):
    assert invoke(_plan(llama, tmp_path / "p")).exit_code == 0
    (tmp_path / "p" / "stale").write_text("from before")
    result = invoke(_plan(llama, tmp_path / "p", "--overwrite"))
    assert result.exit_code == 0, result.output
    assert sorted(x.name for x in (tmp_path / "p").iterdir()) == [OUTPUT_MARKER, "masks.safetensors", "plan.json"]
    assert sorted(x.name for x in tmp_path.iterdir()) == ["p"]


@pytest.fixture
def specials(tmp_path):
    """tmp_path/special/{fifo, null -> /dev/null} and /dev/null: outputs that are neither files nor
    directories (outside the directories the tests snapshot: reading a FIFO blocks)."""
    special = tmp_path / "special"
    special.mkdir()
    os.mkfifo(special / "fifo")
    (special / "null").symlink_to("/dev/null")
    return {"a FIFO": special / "fifo", "a character device": Path("/dev/null"),
            "a symlink to a device": special / "null"}


def _kinds(paths) -> list[tuple[int, int]]:
    return [(os.stat(p).st_mode, os.stat(p).st_rdev) for p in paths]


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_a_device_or_fifo_out_is_refused(specials, tmp_path, llama, saved_plan, no_work, overwrite):
    (tmp_path / "work").mkdir()
    program = tmp_path / "work" / "m.pt2"
    program.write_bytes(b"refused before it is read")
    before = _kinds(specials.values())
    for kind, out in specials.items():
        expected = "a FIFO" if kind == "a FIFO" else "a character device"
        fails_cleanly(_plan(llama, out, *overwrite), expected, unchanged=[tmp_path / "work", llama])   # a directory
        fails_cleanly(["apply", program, saved_plan, "--out", out, "-q", *overwrite], expected,        # a file
                      unchanged=[tmp_path / "work", saved_plan])
    assert _kinds(specials.values()) == before
    assert sorted(p.name for p in (tmp_path / "special").iterdir()) == ["fifo", "null"]


_KILLED_WHILE_WRITING = """
import os, signal, sys
from pathlib import Path
from tamp_fx.runtime.transaction import atomic_directory
with atomic_directory(Path(sys.argv[1]), overwrite=False) as tmp:
    (tmp / "half-written").write_text("...")
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_leftovers_of_a_killed_run_are_removed_by_the_next_run_and_only_those(tmp_path, llama):
    out = tmp_path / "p"
    killed = subprocess.run([sys.executable, "-c", _KILLED_WHILE_WRITING, str(out)])
    assert killed.returncode == -9
    left = [p for p in tmp_path.glob(".p.tmp-*") if not p.name.endswith(OWNER_SUFFIX)]
    assert len(left) == 1 and (left[0] / "half-written").is_file()
    assert len(list(tmp_path.glob(f".p.tmp-*{OWNER_SUFFIX}"))) == 1     # the marker that says whose it is
    alive = tmp_path / f".p.tmp-{os.getpid()}-still-running"      # no marker: never touched
    alive.mkdir()
    other = tmp_path / ".q.tmp-1-another-output"                   # another output's: never touched
    other.mkdir()
    result = invoke(_plan(llama, out))
    assert result.exit_code == 0, result.output
    said = "".join(result.output.split())                         # rich wraps long lines
    assert "leftbyaninterruptedrun" in said and left[0].name in said
    assert sorted(x.name for x in tmp_path.iterdir()) == sorted([".q.tmp-1-another-output", alive.name, "p"])


def test_outputs_get_the_umasks_modes_not_private_temporary_ones(tmp_path, llama):
    old = os.umask(0o022)
    try:
        assert invoke(_plan(llama, tmp_path / "p")).exit_code == 0
        pytest.importorskip("matplotlib")
        assert invoke(["inspect", tmp_path / "p", "--html", tmp_path / "r.html"]).exit_code == 0
    finally:
        os.umask(old)
    assert (tmp_path / "p").stat().st_mode & 0o777 == 0o755      # mkdtemp alone gives 0700
    assert (tmp_path / "p" / "plan.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "r.html").stat().st_mode & 0o777 == 0o644  # mkstemp alone gives 0600
