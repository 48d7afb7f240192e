"""`tamp-fx plan` then `apply` on every tiny family, as a user runs them."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
import transformers
from typer.testing import CliRunner

from tamp_fx.cli.main import app
from tamp_fx.load.processors import load_processor
from tamp_fx.testbeds.models import checkpoint_tensors
from tamp_fx.testbeds.tiny import FAMILIES

runner = CliRunner()


def _digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.rglob("*")) if p.is_file()}


def invoke(*args: str):
    result = runner.invoke(app, [str(a) for a in args])
    return result


@pytest.mark.parametrize("family", FAMILIES)
def test_wanda_plan_and_apply_prune_every_decoder_linear_by_exactly_half_per_row(family, tiny_models, tmp_path):
    model = tiny_models(family)
    before = _digest(model)
    plan_dir, out = tmp_path / "plan", tmp_path / "pruned"
    r = invoke("plan", model, "--calib", model / "calib.jsonl", "--method", "wanda", "--sparsity", "0.5",
               "--out", plan_dir, "--quiet")
    assert r.exit_code == 0, r.output
    r = invoke("apply", model, plan_dir, "--out", out, "--quiet")
    assert r.exit_code == 0, r.output
    assert _digest(model) == before, "the input model directory was modified"

    plan = json.loads((plan_dir / "plan.json").read_text())
    original, pruned = checkpoint_tensors(model), checkpoint_tensors(out)
    assert original.keys() == pruned.keys()
    n_layers = plan["model"]["num_layers"]
    assert len(plan["linears"]) == 7 * n_layers
    for name, tensor in original.items():
        if name in plan["linears"]:
            w = pruned[name]
            zeros_per_row = (w == 0).sum(1)
            assert torch.all(zeros_per_row == w.shape[1] // 2), name
            kept = w != 0
            assert torch.equal(w[kept], tensor[kept]), f"{name}: kept weights changed"
        else:
            assert torch.equal(pruned[name], tensor) and pruned[name].dtype == tensor.dtype, f"{name} changed"

    config = transformers.AutoConfig.from_pretrained(out)
    cls = getattr(transformers, config.architectures[0])
    reloaded = cls.from_pretrained(out)
    assert type(reloaded).__name__ == transformers.AutoConfig.from_pretrained(model).architectures[0]
    assert type(load_processor(out)) is type(load_processor(model))


def test_inspect_shows_a_table_of_per_layer_sparsity(tiny_models, tmp_path):
    model = tiny_models("llama")
    assert invoke("plan", model, "--calib", model / "calib.jsonl", "--method", "magnitude", "--sparsity", "0.3",
                  "--out", tmp_path / "p", "--quiet").exit_code == 0
    r = invoke("inspect", tmp_path / "p")
    assert r.exit_code == 0, r.output
    header = r.output.splitlines()[2]
    assert all(col in header for col in ("q", "k", "v", "o", "gate", "up", "down")), r.output
    assert r.output.count("30.0%") == 2 * 8, r.output
