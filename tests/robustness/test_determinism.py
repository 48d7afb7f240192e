"""The same plan gives the same bytes: masks.safetensors and weights.safetensors byte for byte,
plan.json apart from timings; and plan.json is always valid JSON (no NaN)."""
from __future__ import annotations

import dataclasses
import json
import logging
import math

import tamp_fx
from support.cli import invoke
from tamp_fx.artifact.plan import Plan, without_run_measurements

_FILES = ("masks.safetensors", "weights.safetensors")


def _without_timings(plan_json: str) -> dict:
    return without_run_measurements(json.loads(plan_json))


def test_saving_one_plan_twice_gives_the_same_bytes(saved_plan, tmp_path):
    """safetensors stores metadata in hash order: several keys came out in a new order every save."""
    plan = Plan.load(saved_plan)
    plan.save(tmp_path / "a")
    plan.save(tmp_path / "b")
    for name in ("plan.json", *_FILES):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_planning_again_gives_the_same_bytes(saved_plan, llama, tmp_path):
    again = tamp_fx.plan(llama, llama / "calib.jsonl", tamp_fx.PlanConfig(method="sparsegpt", nsamples=4))
    again.save(tmp_path / "again")
    for name in _FILES:
        assert (tmp_path / "again" / name).read_bytes() == (saved_plan / name).read_bytes(), name
    assert (_without_timings((tmp_path / "again" / "plan.json").read_text())
            == _without_timings((saved_plan / "plan.json").read_text()))


def test_the_same_tamp_command_twice_gives_the_same_plan(llava, tmp_path):
    for name in ("a", "b"):
        result = invoke(["plan", llava, "--calib", llava / "calib.jsonl", "--method", "tamp", "--nsamples", "4",
                         "--out", tmp_path / name, "-q"])
        assert result.exit_code == 0, result.output
    assert (tmp_path / "a" / "masks.safetensors").read_bytes() == (tmp_path / "b" / "masks.safetensors").read_bytes()
    a, b = ((tmp_path / name / "plan.json").read_text() for name in ("a", "b"))
    assert _without_timings(a) == _without_timings(b)


def _strict(text: str):
    """json.loads that refuses NaN and infinities, as JSON does."""
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")
    return json.loads(text, parse_constant=refuse)


def test_non_finite_statistics_are_written_as_null_with_a_warning(saved_plan, tmp_path, caplog):
    plan = Plan.load(saved_plan)
    name, first = next(iter(plan.linears.items()))
    stats = {**first.stats, "importance": math.nan, "scores": [1.0, math.inf]}
    plan = dataclasses.replace(plan, linears={**plan.linears, name: dataclasses.replace(first, stats=stats)},
                               layers=[{**plan.layers[0], "attention_entropy": -math.inf}, *plan.layers[1:]])
    with caplog.at_level(logging.WARNING, logger="tamp_fx.artifact.plan"):
        plan.save(tmp_path / "p")
    data = _strict((tmp_path / "p" / "plan.json").read_text())
    assert data["linears"][name]["stats"]["importance"] is None
    assert data["linears"][name]["stats"]["scores"] == [1.0, None]
    assert data["layers"][0]["attention_entropy"] is None
    assert sum("written as null" in r.getMessage() for r in caplog.records) == 3
    assert Plan.load(tmp_path / "p").linears[name].stats["importance"] is None
