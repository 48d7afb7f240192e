"""N:M patterns end to end: plan + apply through the CLI leave exactly N zeros in every M columns."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import tamp_fx
from tamp_fx.cli.main import app
from tamp_fx.config import ALLOCATIONS, SCORE_NAMES
from tamp_fx.testbeds.models import checkpoint_tensors
from tamp_fx.testbeds.tiny import FAMILIES

runner = CliRunner()


def plan_and_apply(model: Path, tmp_path: Path, *extra: str) -> tuple[dict, dict, dict, str]:
    """Plan with ``extra`` options and apply: (plan.json, original tensors, pruned tensors, plan's output)."""
    planned = runner.invoke(app, ["plan", str(model), "--calib", str(model / "calib.jsonl"), "--nsamples", "2",
                                  "--out", str(tmp_path / "p"), "--quiet", *extra])
    assert planned.exit_code == 0, planned.output
    r = runner.invoke(app, ["apply", str(model), str(tmp_path / "p"), "--out", str(tmp_path / "m"), "--quiet"])
    assert r.exit_code == 0, r.output
    plan = json.loads((tmp_path / "p" / "plan.json").read_text())
    return plan, checkpoint_tensors(model), checkpoint_tensors(tmp_path / "m"), planned.output


def assert_n_of_m(w: torch.Tensor, n: int, m: int, name: str) -> None:
    """Exactly ``n`` zeros in every block of ``m`` consecutive input columns of every row of ``w`` (C_out, C_in)."""
    zeros = (w == 0).reshape(w.shape[0], w.shape[1] // m, m).sum(-1)             # (C_out, C_in / m)
    assert torch.all(zeros == n), f"{name}: zeros per block of {m} range over {zeros.unique().tolist()}"


@pytest.mark.parametrize("family, score", [(f, SCORE_NAMES[i % len(SCORE_NAMES)]) for i, f in enumerate(FAMILIES)])
def test_a_2_4_plan_leaves_exactly_2_zeros_in_every_4_columns_on_every_family(family, score, tiny_models, tmp_path):
    plan, original, pruned, _ = plan_and_apply(tiny_models(family), tmp_path, "--method", score, "--pattern", "2:4")
    assert plan["config"]["pattern"] == "2:4" and plan["config"]["sparsity"] == 0.5
    assert plan["summary"]["sparsity"] == 0.5 and len(plan["linears"]) == 7 * plan["model"]["num_layers"]
    for name, lp in plan["linears"].items():
        assert (lp["pattern"], lp["group"], lp["target_sparsity"]) == ("2:4", "2:4", 0.5)
        assert_n_of_m(pruned[name], 2, 4, name)
        if score != "sparsegpt":
            kept = pruned[name] != 0
            assert torch.equal(pruned[name][kept], original[name][kept]), f"{name}: kept weights changed"


@pytest.mark.parametrize("score", ["magnitude", "sparsegpt"])
def test_4_8_with_a_sparsity_that_differs_warns_and_the_pattern_wins(score, tiny_models, tmp_path):
    plan, _, pruned, output = plan_and_apply(tiny_models("llama"), tmp_path, "--method", score, "--pattern", "4:8",
                                             "--sparsity", "0.3")
    assert "sparsity 0.3 is ignored" in output and plan["config"]["sparsity"] == 0.5
    for name, lp in plan["linears"].items():
        assert lp["pattern"] == "4:8"
        assert_n_of_m(pruned[name], 4, 8, name)


@pytest.mark.parametrize("allocation", [a for a in ALLOCATIONS if a != "uniform"])
def test_das_guided_2_4_meets_its_target_within_one_linear(allocation, tiny_models):
    model = tiny_models("qwen2_vl")
    config = tamp_fx.PlanConfig(method="custom", allocation=allocation, score="wanda", tokens="amia", sparsity=0.4,
                                pattern="2:4", nsamples=2)
    plan = tamp_fx.plan(model, model / "calib.jsonl", config)
    sizes = {name: lp.shape[0] * lp.shape[1] for name, lp in plan.linears.items()}
    pruned = sum(sizes[name] * lp.sparsity for name, lp in plan.linears.items())
    assert abs(pruned - 0.4 * sum(sizes.values())) <= max(sizes.values())
    assert {lp.pattern for lp in plan.linears.values()} == {"2:4", "dense"}
    for name, lp in plan.linears.items():
        mask = plan.masks[name]
        if lp.pattern == "dense":
            assert mask.all() and lp.target_sparsity == 0.0 and lp.sparsity == 0.0
        else:
            assert lp.target_sparsity == 0.5
            assert_n_of_m(mask.to(torch.int8), 2, 4, name)          # zeros of the mask = pruned entries
    importance = {name: lp.stats["nm_importance"] for name, lp in plan.linears.items()}
    sparse = [importance[n] for n, lp in plan.linears.items() if lp.pattern == "2:4"]
    dense = [importance[n] for n, lp in plan.linears.items() if lp.pattern == "dense"]
    assert max(sparse) <= min(dense), "a more important linear was made 2:4 while a less important one stayed dense"


def fails_in_one_line(args: list, expected: str) -> None:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code != 0, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and expected in result.output, result.output


@pytest.mark.parametrize("pattern, expected", [("3:2", "0 < N < M"), ("0:4", "0 < N < M"), ("a:b", "not N:M"),
                                               ("1:3", "layers.0.self_attn.q_proj.weight has 64 input columns")])
def test_bad_patterns_give_one_line_errors(pattern, expected, tiny_models, tmp_path):
    model = tiny_models("llama")
    fails_in_one_line(["plan", model, "--calib", model / "calib.jsonl", "--out", tmp_path / "p", "--quiet",
                       "--nsamples", "2", "--pattern", pattern], expected)
    assert not (tmp_path / "p").exists()


def test_das_guided_sparsity_beyond_the_pattern_is_refused(tiny_models, tmp_path):
    model = tiny_models("llama")
    fails_in_one_line(["plan", model, "--calib", model / "calib.jsonl", "--out", tmp_path / "p", "--quiet",
                       "--nsamples", "2", "--method", "das", "--pattern", "1:4", "--sparsity", "0.3"],
                      "out of reach of pattern 1:4")
