"""`apply_in_memory`: a loaded model pruned in place holds, tensor for tensor and byte for byte,
what `apply` writes (on the tiny LLaVA, whose checkpoint names differ from its module names)."""
from __future__ import annotations

import pytest
import torch

import tamp_fx
from tamp_fx.errors import TampError
from tamp_fx.load.source import load_model, resolve_source


@pytest.fixture(scope="module")
def llava(tiny_models):
    return tiny_models("llava")


@pytest.fixture(scope="module")
def plans(llava):
    """method -> its plan of the tiny LLaVA (SparseGPT's carries reconstructed weights)."""
    return {m: tamp_fx.plan(llava, llava / "calib.jsonl", tamp_fx.PlanConfig(method=m, sparsity=0.5, nsamples=4))
            for m in ("wanda", "sparsegpt")}


def _bytes(tensor: torch.Tensor) -> bytes:
    return tensor.detach().contiguous().view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_the_model_pruned_in_memory_holds_the_bytes_apply_writes(llava, plans, method, tmp_path):
    plan = plans[method]
    assert plan.weights if method == "sparsegpt" else not plan.weights
    written = dict(load_model(resolve_source(tamp_fx.apply(llava, plan, tmp_path / "out"))).named_parameters())
    net = load_model(resolve_source(llava))
    dense = {n: p.detach().clone() for n, p in net.named_parameters()}
    assert tamp_fx.apply_in_memory(net, plan) is net
    pruned = dict(net.named_parameters())
    assert pruned.keys() == written.keys()
    assert all(_bytes(pruned[n]) == _bytes(written[n]) for n in pruned)
    changed = {n for n in pruned if not torch.equal(pruned[n], dense[n])}
    assert changed == {lp.module_name for lp in plan.linears.values()}


def test_a_model_loaded_in_another_dtype_than_its_checkpoint_is_refused_untouched(llava, plans):
    net = load_model(resolve_source(llava), dtype=torch.bfloat16)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    with pytest.raises(TampError, match="another model"):
        tamp_fx.apply_in_memory(net, plans["wanda"], where=llava)
    assert all(torch.equal(p, before[n]) for n, p in net.named_parameters())
