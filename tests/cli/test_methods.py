"""Every method shortcut and every (allocation, score, tokens) combination plans end to end."""
from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from typer.testing import CliRunner

import tamp_fx
from tamp_fx.cli.main import app
from tamp_fx.config import ALLOCATIONS, METHODS, SCORE_NAMES, TOKEN_NAMES
from tamp_fx.testbeds.tiny import FAMILIES

runner = CliRunner()


@pytest.mark.parametrize("family", FAMILIES)
def test_tamp_end_to_end_on_every_family(family, tiny_models, tmp_path):
    model = tiny_models(family)
    r = runner.invoke(app, ["plan", str(model), "--calib", str(model / "calib.jsonl"), "--method", "tamp",
                            "--sparsity", "0.5", "--out", str(tmp_path / "p"), "--quiet"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["apply", str(model), str(tmp_path / "p"), "--out", str(tmp_path / "m"), "--quiet"])
    assert r.exit_code == 0, r.output
    plan = json.loads((tmp_path / "p" / "plan.json").read_text())
    assert plan["method"] == "tamp" and plan["parts"] == {"allocation": "das", "score": "wanda", "tokens": "amia"}
    linears = plan["linears"].values()
    for lp in linears:
        stats = lp["stats"]
        assert stats["diversity"] and "text" in stats["diversity"]
        assert math.isclose(stats["importance"], stats["group_importance"])
        assert 0 < sum(stats["selected_fraction"].values())
        assert 0.5 - 1e-9 <= lp["target_sparsity"] <= 0.6 + 1e-9 or lp["target_sparsity"] < 0.5
    # the allocator's budget is met exactly in parameters
    total = sum(lp["shape"][0] * lp["shape"][1] for lp in linears)
    kept = sum(lp["stats"]["group_keep"] for lp in linears)
    assert kept == math.floor(total * 0.5 + 1e-9)
    if family not in ("llama",):
        assert any(lp["stats"]["selected_fraction"].keys() - {"text"} for lp in linears), "no non-text tokens seen"


@pytest.mark.parametrize("tokens", ["atv", "balanced"])
@pytest.mark.parametrize("family", FAMILIES)
def test_atv_and_balanced_on_every_family(family, tokens, tiny_models):
    """ATV keeps every text token and a share of the others; balanced keeps every token (weighted)."""
    model = tiny_models(family)
    config = tamp_fx.PlanConfig(method="wanda", tokens=tokens, sparsity=0.5, nsamples=2)
    plan = tamp_fx.plan(model, model / "calib.jsonl", config)
    for name, lp in plan.linears.items():
        kept = lp.stats["selected_fraction"]
        assert kept["text"] == 1.0 and all(0.0 <= f <= 1.0 for f in kept.values()), (name, kept)
        if tokens == "balanced":
            assert set(kept.values()) == {1.0}, (name, kept)
        assert math.isclose(lp.sparsity, 0.5, abs_tol=0.01)


@pytest.mark.parametrize("method", list(METHODS))
def test_every_shortcut_on_a_multimodal_family(method, tiny_models):
    model = tiny_models("qwen2_vl")
    plan = tamp_fx.plan(model, model / "calib.jsonl", tamp_fx.PlanConfig(method=method, sparsity=0.6, nsamples=3))
    assert plan.config.method == method
    total = plan.summary()["parameters"]
    pruned = sum(int((~mask).sum()) for mask in plan.masks.values())
    # at most the budget: the allocators keep floor(0.4 P), so up to P - floor(0.4 P) pruned
    assert 0.55 * total <= pruned <= total - math.floor(0.4 * total + 1e-9), (pruned, total)
    for name, lp in plan.linears.items():
        assert math.isclose(lp.sparsity, 1 - plan.masks[name].float().mean().item(), abs_tol=1e-6)


COMBINATIONS = list(itertools.product(ALLOCATIONS, SCORE_NAMES, TOKEN_NAMES))


def _pairwise(allocation: str, score: str, tokens: str) -> bool:
    """A covering set: every (allocation, tokens) pair once, with the score turning round so that
    every (allocation, score) and (score, tokens) pair is in it too. 28 of the 84 run by default."""
    a, t = ALLOCATIONS.index(allocation), TOKEN_NAMES.index(tokens)
    return SCORE_NAMES.index(score) == (a + t) % len(SCORE_NAMES)


def _combination_params():
    """Every combination; those outside the covering set only with ``-m slow``."""
    return [pytest.param(*c, id="+".join(c), marks=() if _pairwise(*c) else pytest.mark.slow) for c in COMBINATIONS]


def test_the_default_combinations_cover_every_pair():
    default = [c for c in COMBINATIONS if _pairwise(*c)]
    for i, j in itertools.combinations(range(3), 2):
        pairs = {(c[i], c[j]) for c in default}
        assert pairs == {(c[i], c[j]) for c in COMBINATIONS}, (i, j)


@pytest.mark.parametrize("allocation, score, tokens", _combination_params())
def test_every_combination_is_valid(allocation, score, tokens, tiny_models):
    model = tiny_models("llava")
    config = tamp_fx.PlanConfig(method="custom", allocation=allocation, score=score, tokens=tokens, sparsity=0.5, nsamples=2)
    plan = tamp_fx.plan(model, model / "calib.jsonl", config)
    assert (plan.config.allocation, plan.config.score, plan.config.tokens) == (allocation, score, tokens)
    assert len(plan.linears) == 14
    if score == "sparsegpt":
        assert plan.weights.keys() == plan.masks.keys()
        assert all(torch.all(plan.weights[k][~plan.masks[k]] == 0) for k in plan.masks)
