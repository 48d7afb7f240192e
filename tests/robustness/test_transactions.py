"""Every output of a command is committed together or not at all (runtime/transaction.Outputs):
a failure after some outputs are written leaves none of them, nor the parent folders made for
a nested ``--out``; a failed rename puts every previous output back; export's program and
calibration and inspect's figures and page go together."""
from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch

import tamp_fx.artifact.report
import tamp_fx.write.export
from support.cli import fails_cleanly, invoke, snapshot
from tamp_fx.errors import TampError
from tamp_fx.runtime import transaction
from tamp_fx.runtime.output import OUTPUT_MARKER
from tamp_fx.runtime.transaction import Outputs
from tamp_fx.write.program import save_program

DISK_FULL = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_outputs_commit_together(tmp_path):
    with Outputs(overwrite=False) as outputs:
        outputs.file(tmp_path / "new" / "a.txt").write_text("a")
        (outputs.directory(tmp_path / "b") / "f").write_text("b")
        assert not (tmp_path / "new" / "a.txt").exists() and not (tmp_path / "b").exists()   # nothing before the end
    assert (tmp_path / "new" / "a.txt").read_text() == "a" and (tmp_path / "b" / "f").read_text() == "b"
    assert (tmp_path / "b" / OUTPUT_MARKER).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "new"]             # no temporary, no marker left


@pytest.mark.parametrize("error", [RuntimeError("the command failed"), DISK_FULL,
                                   Exception("Error while serializing: I/O error: No space left on device (os error 28)")])
def test_a_failure_leaves_nothing_parent_folders_included(tmp_path, error):
    (tmp_path / "keep").write_text("the user's")
    before = snapshot(tmp_path)
    with pytest.raises((type(error), TampError)) as raised:
        with Outputs(overwrite=False) as outputs:
            outputs.file(tmp_path / "x" / "y" / "a.pt2").write_bytes(bytes(5000))
            (outputs.directory(tmp_path / "x" / "z" / "b") / "f").write_text("b")
            raise error
    assert snapshot(tmp_path) == before
    if error is not raised.value:                                   # an I/O failure: one line that says so
        assert str(raised.value).startswith(f"no space left on device while writing {tmp_path / 'x' / 'z' / 'b'} (")
        assert "free space or write it to another path" in str(raised.value)       # the one being written: the last
        assert "--out" not in str(raised.value)          # the path is named; the option that chose it may be another


def test_a_parent_folder_that_gained_other_files_stays(tmp_path):
    with pytest.raises(RuntimeError):
        with Outputs(overwrite=False) as outputs:
            outputs.file(tmp_path / "x" / "a.txt")
            (tmp_path / "x" / "someone-else's").write_text("not ours")
            raise RuntimeError("failed")
    assert [p.name for p in (tmp_path / "x").iterdir()] == ["someone-else's"]


def test_a_failed_rename_puts_every_previous_output_back(tmp_path, monkeypatch):
    (tmp_path / "a").write_text("old a")
    (tmp_path / "b").write_text("old b")
    replace = os.replace

    def fail_on_b(src, dst):
        if Path(dst) == tmp_path / "b" and ".tmp-" in Path(src).name:
            raise OSError(errno.EIO, "injected")
        replace(src, dst)
    monkeypatch.setattr(transaction.os, "replace", fail_on_b)
    with pytest.raises(TampError, match="could not write"):
        with Outputs(overwrite=True) as outputs:
            outputs.file(tmp_path / "a").write_text("new a")
            outputs.file(tmp_path / "b").write_text("new b")
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == {"a": "old a", "b": "old b"}


def test_an_output_that_appears_meanwhile_stops_every_commit(tmp_path):
    with pytest.raises(TampError, match="appeared while this ran"):
        with Outputs(overwrite=False) as outputs:
            outputs.file(tmp_path / "a").write_text("ours")
            outputs.file(tmp_path / "b").write_text("ours")
            (tmp_path / "b").write_text("someone else's")
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == {"b": "someone else's"}


def test_an_output_inside_a_new_output_directory_is_written_in_it(tmp_path):
    with Outputs(overwrite=False) as outputs:
        outputs.directory(tmp_path / "figs")
        outputs.file(tmp_path / "figs" / "sub" / "report.html").write_text("page")
    assert (tmp_path / "figs" / "sub" / "report.html").read_text() == "page"


def test_one_path_for_two_outputs_is_refused(tmp_path):
    with pytest.raises(TampError, match="two outputs"):
        with Outputs(overwrite=False) as outputs:
            outputs.file(tmp_path / "a")
            outputs.file(tmp_path / "a")
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif(not Path("/dev/full").is_char_device(), reason="no /dev/full device here")
def test_a_full_disk_under_torchs_pt2_writer_is_an_oserror_not_an_abort():
    """/dev/full answers every write with ENOSPC: torch's C++ writer would terminate the process."""
    ep = torch.export.export(torch.nn.Linear(64, 64), (torch.randn(2, 64),))
    with pytest.raises(OSError) as raised:
        save_program(ep, Path("/dev/full"))
    assert raised.value.errno == errno.ENOSPC


def test_export_commits_neither_file_when_the_calibration_fails(tmp_path, llama, monkeypatch):
    def full(path, samples):
        Path(path).write_bytes(bytes(1000))
        raise DISK_FULL
    monkeypatch.setattr(tamp_fx.write.export, "save_program_calibration", full)
    out, calib_out = tmp_path / "new" / "deeper" / "model.pt2", tmp_path / "new" / "inputs.safetensors"
    fails_cleanly(["export", llama, "--calib", llama / "calib.jsonl", "--out", out, "--calib-out", calib_out,
                   "--nsamples", 2, "--seqlen", 16, "-q"], "no space left on device while writing",
                  out, calib_out, unchanged=[tmp_path, llama])


@pytest.fixture
def html_fails(monkeypatch):
    def full(data, pngs):
        raise DISK_FULL
    monkeypatch.setattr(tamp_fx.artifact.report, "html_page", full)


def test_inspect_writes_neither_figures_nor_page_when_one_fails(tmp_path, plan_copy, html_fails):
    figs, page = tmp_path / "out" / "figs", tmp_path / "out" / "report.html"
    fails_cleanly(["inspect", plan_copy, "--plot", figs, "--html", page, "-q"], "no space left on device",
                  figs, page, unchanged=[tmp_path])


def test_inspect_into_an_existing_folder_writes_no_figure_when_the_page_fails(tmp_path, plan_copy, html_fails):
    (tmp_path / "figs").mkdir()
    fails_cleanly(["inspect", plan_copy, "--plot", tmp_path / "figs", "--html", tmp_path / "report.html", "-q"],
                  "no space left on device", unchanged=[tmp_path])


def test_inspect_writes_its_page_inside_its_new_figure_folder(tmp_path, plan_copy):
    figs = tmp_path / "figs"
    result = invoke(["inspect", plan_copy, "--plot", figs, "--html", figs / "report.html", "-q"])
    assert result.exit_code == 0, result.output
    assert (figs / "report.html").is_file() and list(figs.glob("*.png"))
