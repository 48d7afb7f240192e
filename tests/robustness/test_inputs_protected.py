"""No input is ever overwritten, deleted or changed, whatever --out and --overwrite say: the
model, the plan given to `apply`, the calibration file, every media file it names, and any
directory holding one of them. Each clash is refused in one line before any work."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from support.cli import fails_cleanly, invoke


@pytest.fixture
def workspace(tmp_path, llava) -> Path:
    """tmp_path/data/{calib.jsonl, images/*.png} and tmp_path/model: a copy of the tiny llava."""
    shutil.copytree(llava, tmp_path / "model")
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(llava / "calib.jsonl", data / "calib.jsonl")
    shutil.copytree(llava / "images", data / "images")
    return tmp_path


def _outs(tmp_path: Path) -> dict[str, Path]:
    """Every kind of --out that would replace or change an input of `plan` in ``workspace``."""
    image = next((tmp_path / "data" / "images").iterdir())
    (tmp_path / "link-to-model").symlink_to(tmp_path / "model")
    return {"model": tmp_path / "model", "inside model": tmp_path / "model" / "plan",
            "symlink to model": tmp_path / "link-to-model", "through a symlink into model": tmp_path / "link-to-model" / "p",
            "calibration file": tmp_path / "data" / "calib.jsonl", "directory of calibration file": tmp_path / "data",
            "an image": image, "directory of the images": image.parent, "their common parent": tmp_path,
            "with dot-dot": tmp_path / "data" / "images" / ".." / ".."}


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_plan_refuses_every_out_that_touches_an_input(workspace, overwrite):
    for out in _outs(workspace).values():
        args = ["plan", workspace / "model", "--calib", workspace / "data" / "calib.jsonl", "--out", out, "-q", *overwrite]
        fails_cleanly(args, "input", unchanged=[workspace])


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_apply_refuses_every_out_that_touches_the_model_or_the_plan(workspace, saved_plan, llama, overwrite):
    plan = shutil.copytree(saved_plan, workspace / "plan")
    model = shutil.copytree(llama, workspace / "llama")
    for out in (plan, plan / "masks.safetensors", plan / "sub", model, model / "pruned", workspace):
        fails_cleanly(["apply", model, plan, "--out", out, "-q", *overwrite], "input", unchanged=[workspace])


def test_the_two_data_loss_cases_of_issue_10(workspace, saved_plan, llama):
    """`apply M PLAN --out PLAN --overwrite` replaced the plan; `plan M --calib DIR/calib.jsonl
    --out DIR --overwrite` deleted the calibration data."""
    plan = shutil.copytree(saved_plan, workspace / "plan")
    fails_cleanly(["apply", llama, plan, "--out", plan, "--overwrite", "-q"], "would overwrite the input",
                  unchanged=[workspace, llama])
    data = workspace / "data"
    fails_cleanly(["plan", workspace / "model", "--calib", data / "calib.jsonl", "--out", data, "--overwrite", "-q"],
                  "would overwrite a directory holding the input", unchanged=[workspace])


def test_convert_refuses_the_directory_holding_its_gguf(tmp_path):
    from support.corrupt import gguf_cut_in_header
    gguf = gguf_cut_in_header(tmp_path / "m.gguf")        # refused before the file is read
    for out in (tmp_path, gguf):
        fails_cleanly(["convert", gguf, "--out", out, "--overwrite"], "input", unchanged=[tmp_path])


def test_apply_to_an_exported_program_refuses_its_inputs(tmp_path, saved_plan):
    model, calib = tmp_path / "m.pt2", tmp_path / "inputs.safetensors"
    model.write_bytes(b"not read: refused first")
    calib.write_bytes(b"not read either")
    for out in (model, calib):
        fails_cleanly(["apply", model, saved_plan, "--out", out, "--calib", calib, "--quantize", "pt2e-x86",
                       "--overwrite", "-q"], "would overwrite the input", unchanged=[tmp_path, saved_plan])


def test_fixture_refuses_its_own_weights_and_clashing_outputs(tmp_path, monkeypatch):
    import tamp_fx.testbeds.fixture.model as fixture_model
    weights = tmp_path / "package" / "weights.safetensors"
    weights.parent.mkdir()
    weights.write_bytes(b"the committed fixture weights")
    monkeypatch.setattr(fixture_model, "WEIGHTS", weights)
    fails_cleanly(["fixture", "--out", weights.parent, "--overwrite"], "input", unchanged=[tmp_path])
    fails_cleanly(["fixture", "--out", tmp_path / "a", "--calib-out", tmp_path / "a"], "input", unchanged=[tmp_path])
    fails_cleanly(["fixture", "--out", tmp_path / "a", "--calib-out", tmp_path / "a" / "c"], "input", unchanged=[tmp_path])


def test_a_plan_beside_its_calibration_data_is_fine(workspace):
    """Writing next to an input (not over it) is allowed: the guard is not a blanket refusal."""
    out = workspace / "data" / "plan"
    result = invoke(["plan", workspace / "model", "--calib", workspace / "data" / "calib.jsonl", "--out", out, "-q"])
    assert result.exit_code == 0, result.output
    assert (out / "plan.json").is_file()
