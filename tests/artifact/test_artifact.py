"""Plans round-trip through disk unchanged, and broken plan directories are refused clearly."""
from __future__ import annotations

import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tamp_fx import LinearPlan, Plan, PlanConfig, TampError

finite = st.floats(allow_nan=False, allow_infinity=False, width=64)


@st.composite
def plans(draw):
    linears, masks = {}, {}
    for i in range(draw(st.integers(1, 4))):
        shape = (draw(st.integers(1, 9)), draw(st.integers(1, 17)))
        mask = torch.rand(shape, generator=torch.Generator().manual_seed(draw(st.integers(0, 999)))) < draw(st.floats(0, 1))
        name = f"model.layers.{i}.mlp.up_proj.weight"
        masks[name] = mask
        linears[name] = LinearPlan(i, name, shape, draw(st.floats(0, 0.99)), float(1 - mask.float().mean()), "row",
                                   draw(st.sampled_from(["attention", "mlp"])), {"score": draw(finite), "tokens": draw(st.integers(0, 10**6))})
    config = PlanConfig(method=draw(st.sampled_from(["wanda", "magnitude"])), sparsity=draw(st.floats(0, 0.99)),
                        nsamples=draw(st.integers(1, 256)))
    return Plan(config, {"fingerprint": "sha256:00", "model_type": "llama"}, linears, [{"layer": 0, "seconds": 0.5}], masks)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(plan=plans())
def test_plans_round_trip_through_disk_unchanged(plan, tmp_path_factory):
    out = tmp_path_factory.mktemp("plan") / "p"
    plan.save(out)
    loaded = Plan.load(out)
    assert loaded == plan
    assert loaded.masks.keys() == plan.masks.keys()
    assert all(torch.equal(loaded.masks[k], plan.masks[k]) for k in plan.masks)
    assert json.loads((out / "plan.json").read_text())["schema_version"] == 1


def test_saving_refuses_an_existing_directory_unless_told(tmp_path):
    plan = Plan(PlanConfig(), {"fingerprint": "x"}, {}, [], {})
    (tmp_path / "p").mkdir()
    with pytest.raises(TampError, match="already exists"):
        plan.save(tmp_path / "p")
    plan.save(tmp_path / "p", overwrite=True)
    assert (tmp_path / "p" / "plan.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["p"], "no temporary directory may be left behind"


def test_loading_a_directory_without_a_plan_says_so(tmp_path):
    with pytest.raises(TampError, match="not a plan directory"):
        Plan.load(tmp_path)
    (tmp_path / "plan.json").write_text("{not json")
    (tmp_path / "masks.safetensors").write_bytes(b"")
    with pytest.raises(TampError, match="not valid JSON"):
        Plan.load(tmp_path)


@pytest.mark.parametrize("kwargs, message", [({"sparsity": 1.0}, "outside"), ({"sparsity": -0.1}, "outside"),
                                             ({"method": "nope"}, "unknown method"), ({"nsamples": 0}, "nsamples")])
def test_configs_refuse_bad_values_in_one_line(kwargs, message):
    with pytest.raises(TampError, match=message) as error:
        PlanConfig(**kwargs)
    assert "\n" not in str(error.value)
