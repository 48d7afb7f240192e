"""`tamp-fx export` then `tamp-fx plan model.pt2` then `tamp-fx apply` (issue 12).

The exported program is planned by the same layer-by-layer driver as the Hugging Face model,
on the inputs the full model hands its decoder; the layers' ATen graphs, their inputs and the
observers' arithmetic are the same, so the masks are bit-identical (asserted, no tolerance).
"""
from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

import tamp_fx
from tamp_fx.artifact.plan import Plan
from tamp_fx.cli.main import app
from tamp_fx.load.program import load_program
from tamp_fx.modality import Modality
from tamp_fx.testbeds.tiny import FAMILIES, slow_except
from tamp_fx.write.program import load_program_calibration

runner = CliRunner()
METHODS = ("tamp", "sparsegpt", "owl")


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def by_layer(plan: Plan) -> dict[tuple[int, str], str]:
    """(layer, name inside the layer) -> plan key: HF and program plans name their layers differently."""
    out = {}
    for key, lp in plan.linears.items():
        out[(lp.layer, lp.module_name.split(f".{lp.layer}.", 1)[1])] = key   # model.layers.3.mlp.up_proj.weight -> mlp.up_proj.weight
    return out


def assert_same_masks(hf: Plan, program: Plan) -> None:
    a, b = by_layer(hf), by_layer(program)
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.equal(hf.masks[a[k]], program.masks[b[k]]), k
        assert hf.linears[a[k]].stats == program.linears[b[k]].stats, k   # per-modality token counts included
        if a[k] in hf.weights:
            assert torch.equal(hf.weights[a[k]], program.weights[b[k]]), k


def export(model_dir, out_dir):
    r = invoke("export", model_dir, "--calib", model_dir / "calib.jsonl", "--out", out_dir / "model.pt2",
               "--calib-out", out_dir / "inputs.safetensors", "--quiet")
    assert r.exit_code == 0, r.output
    return out_dir / "model.pt2", out_dir / "inputs.safetensors"


@pytest.fixture(scope="module")
def llava_program(tiny_models, tmp_path_factory):
    model_dir = tiny_models("llava")
    return (model_dir, *export(model_dir, tmp_path_factory.mktemp("llava-export")))


@pytest.mark.parametrize("family", slow_except(FAMILIES, "qwen2_vl"))  # multimodal rotary positions by default
def test_export_plan_apply_gives_the_hf_plans_masks(family, tiny_models, tmp_path):
    model_dir = tiny_models(family)
    program, inputs = export(model_dir, tmp_path)
    samples = load_program_calibration(inputs)
    assert len(samples) == 4 and all(s.labels is not None and s.targets is not None for s in samples)
    expected = {Modality.TEXT} | ({Modality.AUDIO} if "audio" in family else set() if family == "llama" else {Modality.IMAGE})
    assert {Modality(int(v)) for s in samples for v in s.labels.unique()} == expected
    for method in METHODS:
        config = tamp_fx.PlanConfig(method=method, sparsity=0.5)
        assert_same_masks(tamp_fx.plan(model_dir, model_dir / "calib.jsonl", config), tamp_fx.plan(program, inputs, config))
    r = invoke("plan", program, "--calib", inputs, "--method", "tamp", "--out", tmp_path / "plan", "--quiet")
    assert r.exit_code == 0, r.output
    r = invoke("apply", program, tmp_path / "plan", "--out", tmp_path / "pruned.pt2", "--quiet")
    assert r.exit_code == 0, r.output
    plan = Plan.load(tmp_path / "plan")
    before, after = load_program(program), load_program(tmp_path / "pruned.pt2")
    for name, tensor in before.state_dict.items():
        expected_tensor = tensor * plan.masks[name] if name in plan.masks else tensor
        assert torch.equal(after.state_dict[name], expected_tensor), name
    masked = before.module()
    with torch.no_grad():
        for name, mask in plan.masks.items():
            masked.get_parameter(name).mul_(mask)
        assert torch.equal(after.module()(*samples[0].args), masked(*samples[0].args))


def test_ecoflap_on_an_exported_decoder_uses_the_models_next_token_loss(llava_program):
    """The program's loss (cross entropy of its logits on the calibration targets) is the Hugging
    Face model's loss, so ECoFLaP allocates alike; the losses agree to float32 rounding, not bit
    for bit (the HF loss sums over positions in another order), hence the allocation is compared
    to 1e-4 and the masks exactly."""
    model_dir, program, inputs = llava_program
    config = tamp_fx.PlanConfig(method="ecoflap", sparsity=0.5)
    hf, pg = tamp_fx.plan(model_dir, model_dir / "calib.jsonl", config), tamp_fx.plan(program, inputs, config)
    a, b = by_layer(hf), by_layer(pg)
    for k in a:
        assert abs(hf.linears[a[k]].target_sparsity - pg.linears[b[k]].target_sparsity) < 1e-4, k
        assert torch.equal(hf.masks[a[k]], pg.masks[b[k]]), k


@pytest.mark.parametrize("pattern", ["2:4"])
@pytest.mark.parametrize("method", ["das", "amia", "ecoflap"])
def test_every_method_and_nm_pattern_plans_an_exported_decoder(method, pattern, llava_program):
    _, program, inputs = llava_program
    for p in (None, pattern):
        plan = tamp_fx.plan(program, inputs, tamp_fx.PlanConfig(method=method, pattern=p))
        assert len(plan.linears) == 14
        if p:
            for mask in plan.masks.values():
                groups = mask.reshape(mask.shape[0], -1, 4)              # (C_out, C_in / 4, 4)
                assert torch.all(((~groups).sum(-1) == 2) | ((~groups).sum(-1) == 0))


def test_export_errors_write_nothing_and_keep_inputs(tiny_models, tmp_path):
    model_dir = tiny_models("llama")
    calib = model_dir / "calib.jsonl"
    cases = [
        (["--out", tmp_path / "m.onnx", "--calib-out", tmp_path / "i.safetensors"], "pass e.g. --out model.pt2"),
        (["--out", tmp_path / "m.pt2", "--calib-out", tmp_path / "i.json"], "--calib-out inputs.safetensors"),
        (["--out", model_dir / "m.pt2", "--calib-out", tmp_path / "i.safetensors"], "would be written inside the input"),
    ]
    before = sorted(p.name for p in model_dir.iterdir())
    for extra, expected in cases:
        r = invoke("export", model_dir, "--calib", calib, *extra, "--quiet")
        assert r.exit_code == 1 and expected in r.output, r.output
    assert sorted(p.name for p in model_dir.iterdir()) == before
    (tmp_path / "taken.pt2").write_text("keep me")
    r = invoke("export", model_dir, "--calib", calib, "--out", tmp_path / "taken.pt2", "--calib-out", tmp_path / "i.safetensors", "--quiet")
    assert r.exit_code == 1 and "already exists" in r.output, r.output
    assert (tmp_path / "taken.pt2").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.pt2"]
