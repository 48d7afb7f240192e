"""Bad input gets a one-line error, a non-zero exit, and nothing written."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from support.cli import fails_cleanly
from tamp_fx.cli.main import app

runner = CliRunner()


@pytest.fixture
def llama(tiny_models):
    return tiny_models("llama")


def plan_args(model, calib, out, *extra):
    return ["plan", model, "--calib", calib, "--out", out, "--quiet", *extra]


def test_missing_model_directory(tmp_path, llama):
    fails_cleanly(plan_args(tmp_path / "nope", llama / "calib.jsonl", tmp_path / "p"), "does not exist", tmp_path / "p")


def test_directory_without_config(tmp_path, llama):
    (tmp_path / "m").mkdir()
    fails_cleanly(plan_args(tmp_path / "m", llama / "calib.jsonl", tmp_path / "p"), "no config.json", tmp_path / "p")


def _copy(model: Path, dest: Path) -> Path:
    shutil.copytree(model, dest)
    return dest


def test_corrupt_config(tmp_path, llama):
    m = _copy(llama, tmp_path / "m")
    (m / "config.json").write_text("{ this is not json")
    fails_cleanly(plan_args(m, llama / "calib.jsonl", tmp_path / "p"), "could not read the config", tmp_path / "p")


def test_corrupt_weights(tmp_path, llama):
    m = _copy(llama, tmp_path / "m")
    (m / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    fails_cleanly(plan_args(m, llama / "calib.jsonl", tmp_path / "p"), "could not load model", tmp_path / "p")


def test_a_failure_inside_transformers_says_what_to_check(tmp_path, llama, monkeypatch):
    """Whatever transformers raises while building the model: one line, the model, the cause and the fix."""
    import transformers

    from tamp_fx.errors import TampError
    from tamp_fx.load.source import load_model, resolve_source

    def broken(*args, **kwargs):
        raise KeyError("model.layers.0.mlp.gate_proj.weight")
    monkeypatch.setattr(transformers.LlamaForCausalLM, "from_pretrained", broken)
    with pytest.raises(TampError) as raised:
        load_model(resolve_source(llama))
    message = str(raised.value)
    assert message.startswith(f"could not load model {llama} (") and "gate_proj" in message
    assert message.endswith(f"check that its files are complete and readable by transformers {transformers.__version__}")


def test_unsupported_architecture_names_the_supported_ones(tmp_path, llama):
    m = _copy(llama, tmp_path / "m")
    config = json.loads((m / "config.json").read_text())
    (m / "config.json").write_text(json.dumps({**config, "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    fails_cleanly(plan_args(m, llama / "calib.jsonl", tmp_path / "p"), "unsupported architecture 'gpt2'", tmp_path / "p")
    result = runner.invoke(app, [str(a) for a in plan_args(m, llama / "calib.jsonl", tmp_path / "p")])
    assert "llava" in result.output and "qwen2_vl" in result.output


@pytest.mark.parametrize("sparsity", ["1.0", "-0.2", "1.5"])
def test_sparsity_outside_the_unit_interval(tmp_path, llama, sparsity):
    fails_cleanly(plan_args(llama, llama / "calib.jsonl", tmp_path / "p", "--sparsity", sparsity), "is not in [0, 1)", tmp_path / "p")


def test_missing_calibration_file(tmp_path, llama):
    fails_cleanly(plan_args(llama, tmp_path / "none.jsonl", tmp_path / "p"), "does not exist", tmp_path / "p")


def test_empty_calibration_file(tmp_path, llama):
    (tmp_path / "empty.txt").write_text("")
    fails_cleanly(plan_args(llama, tmp_path / "empty.txt", tmp_path / "p"), "is empty", tmp_path / "p")


def test_calibration_that_points_at_a_missing_image(tmp_path, tiny_models):
    model = tiny_models("llava")
    calib = tmp_path / "calib.jsonl"
    calib.write_text(json.dumps({"image": "gone.png", "conversations": [{"from": "human", "value": "<image>\nHi"}]}) + "\n")
    fails_cleanly(plan_args(model, calib, tmp_path / "p"), "missing file", tmp_path / "p")


def test_a_plan_for_another_model_is_refused(tmp_path, tiny_models):
    a, b = tiny_models("llama", seed=0), tiny_models("llama", seed=1)
    assert runner.invoke(app, [str(x) for x in plan_args(a, a / "calib.jsonl", tmp_path / "p")]).exit_code == 0
    fails_cleanly(["apply", b, tmp_path / "p", "--out", tmp_path / "out", "--quiet"], "made for another model", tmp_path / "out")
    other = tiny_models("qwen2_vl")
    fails_cleanly(["apply", other, tmp_path / "p", "--out", tmp_path / "out", "--quiet"], "another model", tmp_path / "out")


def test_existing_output_is_refused_unless_overwrite_and_the_input_never(tmp_path, llama):
    (tmp_path / "p").mkdir()
    fails_cleanly(plan_args(llama, llama / "calib.jsonl", tmp_path / "p"), "already exists")
    assert list((tmp_path / "p").iterdir()) == []
    result = runner.invoke(app, [str(x) for x in plan_args(llama, llama / "calib.jsonl", tmp_path / "p", "--overwrite")])
    assert result.exit_code == 0, result.output
    m = _copy(llama, tmp_path / "m")
    fails_cleanly(["apply", m, tmp_path / "p", "--out", m, "--overwrite", "--quiet"], "would overwrite")
    assert (m / "model.safetensors").read_bytes() == (llama / "model.safetensors").read_bytes()


def test_apply_with_a_directory_that_is_not_a_plan(tmp_path, llama):
    fails_cleanly(["apply", llama, tmp_path, "--out", tmp_path / "out", "--quiet"], "not a plan directory", tmp_path / "out")
