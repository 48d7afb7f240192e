"""Writers hold one weight at a time: a SparseGPT plan saved, read back and applied never unpacks,
reads or prunes a weight before the last one was let go, so a plan or model of 8B parameters
needs memory for its largest weight, not for all of them."""
from __future__ import annotations

import weakref

import pytest
import torch

import tamp_fx
from tamp_fx.artifact.plan import Plan
from tamp_fx.load.source import load_model, resolve_source
from tamp_fx.prune.masks import KeptValues
from tamp_fx.runtime.tensor_file import StoredTensor


@pytest.fixture(scope="module")
def llava(tiny_models):
    return tiny_models("llava")


@pytest.fixture(scope="module")
def plan(llava):
    plan = tamp_fx.plan(llava, llava / "calib.jsonl", tamp_fx.PlanConfig(method="sparsegpt", sparsity=0.5, nsamples=4))
    assert len(plan.weights) == len(plan.linears) > 1
    return plan


def _one_at_a_time(monkeypatch, owner, name: str) -> list[weakref.ref]:
    """Patch ``owner.name`` (a method returning a tensor) to fail if a tensor it returned earlier is still alive."""
    made, real = [], getattr(owner, name)

    def once_the_last_is_gone(*args, **kwargs):
        assert all(ref() is None for ref in made), f"{owner.__name__}.{name}: an earlier tensor is still held"
        tensor = real(*args, **kwargs)
        made.append(weakref.ref(tensor))
        return tensor

    monkeypatch.setattr(owner, name, once_the_last_is_gone)
    return made


def test_a_plan_is_saved_one_weight_at_a_time_and_read_back_only_when_asked(plan, tmp_path, monkeypatch):
    unpacked = _one_at_a_time(monkeypatch, KeptValues, "unpack")
    plan.save(tmp_path / "plan")
    assert len(unpacked) == len(plan.weights)
    monkeypatch.undo()

    read = _one_at_a_time(monkeypatch, StoredTensor, "read")
    loaded = Plan.load(tmp_path / "plan")
    assert not read, "loading a plan read its weights"
    assert {n: loaded.weights.layout(n) for n in loaded.weights} == {n: plan.weights.layout(n) for n in plan.weights}
    loaded.save(tmp_path / "again")
    assert len(read) == len(plan.weights)
    assert (tmp_path / "again" / "weights.safetensors").read_bytes() == (tmp_path / "plan" / "weights.safetensors").read_bytes()
    monkeypatch.undo()
    assert all(torch.equal(loaded.weights[n], plan.weights[n]) for n in plan.weights)


def test_apply_reads_and_prunes_one_tensor_at_a_time(llava, plan, tmp_path, monkeypatch):
    plan.save(tmp_path / "plan")
    loaded = Plan.load(tmp_path / "plan")
    pruned = _one_at_a_time(monkeypatch, Plan, "pruned")
    out = tamp_fx.apply(llava, loaded, tmp_path / "out")
    assert len(pruned) > len(plan.linears)                     # every tensor of the checkpoint went through
    monkeypatch.undo()
    written = dict(load_model(resolve_source(out)).named_parameters())
    reference = dict(load_model(resolve_source(tamp_fx.apply(llava, plan, tmp_path / "reference"))).named_parameters())
    assert all(torch.equal(written[n], reference[n]) for n in reference)
