"""Damaged models are refused in one line naming the tensor, before any work, by every command
that loads one (plan layer by layer and whole, apply, export, eval), with nothing written and
the model unchanged: tensors missing, renamed, of the wrong shape or dtype, holding NaN or inf
(unless --allow-nonfinite), a config that disagrees with the weights, and damaged .pt2 archives."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from support.cli import fails_cleanly, invoke
from support.corrupt import CHECKPOINT_DAMAGE, config_disagrees, damage_checkpoint, flip_bytes, rewrite_member


@pytest.fixture
def work(tmp_path) -> Path:
    """A folder of a test's damaged inputs; every file in it must be left as it was."""
    (tmp_path / "in").mkdir()
    return tmp_path / "in"


def _damaged(model: Path, work: Path, how: str) -> tuple[Path, str]:
    """A copy of ``model`` in ``work`` damaged ``how`` (or config.json disagreeing), and what the refusal names."""
    copy = Path(shutil.copytree(model, work / model.name))
    if how == "hidden_size disagrees":
        config_disagrees(copy)
        return copy, "config.json"
    key = damage_checkpoint(copy, how)
    return copy, key.split("model.")[-1].replace("q_prj", "q_proj")


def _refused(args: list, work: Path, out: Path, named: str, expected: str) -> None:
    output = fails_cleanly(args, named, out, unchanged=[work], code=1)
    assert expected in output, output


def _plan(model: Path, calib: Path, out: Path, *extra) -> list:
    return ["plan", model, "--calib", calib, "--out", out, "--nsamples", 2, "--seqlen", 16, "-q", *extra]


EVERY = [*CHECKPOINT_DAMAGE, "hidden_size disagrees"]
EXPECTED = {**{how: said for how, (_, said) in CHECKPOINT_DAMAGE.items()}, "hidden_size disagrees": "has shape"}


@pytest.mark.parametrize("how", EVERY)
def test_plan_layer_by_layer_refuses(how, llava, work, tmp_path):
    model, named = _damaged(llava, work, how)
    _refused(_plan(model, llava / "calib.jsonl", tmp_path / "plan"), work, tmp_path / "plan", named, EXPECTED[how])


@pytest.mark.parametrize("how", ["missing vision weight", "missing embedding", "vision weight of the wrong shape",
                                 "fp8 e4m3 decoder weight", "NaN in a decoder weight", "hidden_size disagrees"])
def test_plan_whole_model_refuses(how, llava, work, tmp_path):
    """from_pretrained would fill a missing tensor at random and cast fp8 silently: refused first."""
    model, named = _damaged(llava, work, how)
    args = _plan(model, llava / "calib.jsonl", tmp_path / "plan", "--whole-model")
    _refused(args, work, tmp_path / "plan", named, EXPECTED[how])


@pytest.mark.parametrize("how", ["missing decoder weight", "missing lm_head", "decoder weight of the wrong shape",
                                 "int32 decoder weight", "NaN in a decoder weight", "inf in the embedding"])
def test_apply_refuses(how, llama, saved_plan, work, tmp_path):
    model, named = _damaged(llama, work, how)
    _refused(["apply", model, saved_plan, "--out", tmp_path / "pruned", "-q"], work, tmp_path / "pruned", named,
             EXPECTED[how])


@pytest.mark.parametrize("how", ["missing embedding", "fp8 e5m2 vision weight", "-inf in a vision weight"])
def test_export_refuses(how, llava, work, tmp_path):
    model, named = _damaged(llava, work, how)
    args = ["export", model, "--calib", llava / "calib.jsonl", "--out", tmp_path / "m.pt2", "--calib-out",
            tmp_path / "inputs.safetensors", "--nsamples", 2, "-q"]
    _refused(args, work, tmp_path / "m.pt2", named, EXPECTED[how])
    assert not (tmp_path / "inputs.safetensors").exists()


@pytest.mark.parametrize("how", ["missing lm_head", "vision weight of the wrong shape", "NaN in a decoder weight"])
def test_eval_refuses(how, llava, work, tmp_path):
    model, named = _damaged(llava, work, how)
    text = work / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 20)
    _refused(["eval", model, "--text", text, "--no-vqa", "--seqlen", 8, "--max-windows", 1, "-q"], work,
             tmp_path / "none", named, EXPECTED[how])


def test_allow_nonfinite_plans_a_model_whose_unused_embedding_row_is_infinite(llama, work, tmp_path):
    model, _ = _damaged(llama, work, "inf in the embedding")            # row 7: a token the samples may not use
    args = _plan(model, llama / "calib.jsonl", tmp_path / "plan", "--method", "magnitude")
    fails_cleanly(args, "--allow-nonfinite", tmp_path / "plan", unchanged=[work], code=1)
    result = invoke([*args, "--allow-nonfinite"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "plan" / "plan.json").is_file()


# --- exported programs --------------------------------------------------------------------

@pytest.fixture(scope="module")
def program(llama, tmp_path_factory) -> tuple[Path, Path]:
    """The tiny llama's decoder exported with `tamp-fx export`, and its calibration inputs."""
    root = tmp_path_factory.mktemp("program")
    result = invoke(["export", llama, "--calib", llama / "calib.jsonl", "--out", root / "m.pt2", "--calib-out",
                     root / "inputs.safetensors", "--nsamples", 2, "--seqlen", 16, "-q"])
    assert result.exit_code == 0, result.output
    return root / "m.pt2", root / "inputs.safetensors"


def _nan_weight(data: bytes) -> bytes:
    return b"\x00\x00\xc0\x7f" + data[4:]                     # float32 NaN as the first value


#: name -> (damage of a copy of the program, what the refusal says)
PROGRAM_DAMAGE = {
    "flipped bytes in a weight": (lambda p, d: flip_bytes(Path(shutil.copy(p, d)), len(p.read_bytes()) // 3),
                                  "damaged"),
    "cut short": (lambda p, d: d.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]) and d, "m.pt2"),
    "constants config cut": (lambda p, d: rewrite_member(p, d, "constants_config.json", lambda b: b[: len(b) // 2]),
                             "damaged"),
    "weights config not an object": (lambda p, d: rewrite_member(p, d, "weights_config.json", lambda b: b"[]"),
                                     "weights_config.json"),
    "an empty weight file": (lambda p, d: rewrite_member(p, d, "weight_0", lambda b: b""), "weight_0"),
    "NaN in a weight": (lambda p, d: rewrite_member(p, d, "weight_1", _nan_weight), "NaN"),
}


@pytest.mark.parametrize("how", PROGRAM_DAMAGE)
@pytest.mark.parametrize("command", ["plan", "apply"])
def test_a_damaged_program_is_refused(how, command, program, saved_plan, work, tmp_path):
    damage, expected = PROGRAM_DAMAGE[how]
    model = work / "m.pt2"
    damage(program[0], model)
    out = tmp_path / ("plan" if command == "plan" else "pruned.pt2")
    args = (["plan", model, "--calib", program[1], "--out", out, "-q"] if command == "plan"
            else ["apply", model, saved_plan, "--out", out, "-q"])
    fails_cleanly(args, expected, out, unchanged=[work, saved_plan], code=1)
