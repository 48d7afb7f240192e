"""`apply` records how a pruned Hugging Face directory was made: ``tamp-fx.json`` (the plan's method,
sparsity and calibration, the sparsity actually written, the fingerprint, the command) and a
model card, new or appended to the input's copy; the model loads as before, and every output
gets the modes the umask gives."""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import shlex
import shutil
from enum import Enum
from pathlib import Path

import pytest
import torch
import transformers
import typer
from safetensors import safe_open
from safetensors.torch import save_file

import tamp_fx
from support.cli import invoke
from support.snapshot import snapshot
from tamp_fx.artifact.plan import Plan, without_run_measurements
from tamp_fx.cli.main import app
from tamp_fx.testbeds.models import checkpoint_tensors
from tamp_fx.write.provenance import CARD_SECTION, PROVENANCE_FILE, PYTHON_API, plan_command


@pytest.fixture(scope="module")
def model(tiny_models, tmp_path_factory) -> Path:
    """The tiny llama with one row of a decoder linear all zeros: a Wanda plan prunes half of each
    row, so half of that row is zero and kept, and the model written is sparser than planned."""
    model = Path(shutil.copytree(tiny_models("llama"), tmp_path_factory.mktemp("model") / "llama"))
    for shard in model.glob("*.safetensors"):
        with safe_open(shard, "pt") as f:
            metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
        for name in tensors:
            if name.endswith("layers.0.mlp.down_proj.weight"):
                tensors[name][0] = 0
                save_file(tensors, shard, metadata=metadata)
    return model


@pytest.fixture(scope="module")
def plan_dir(model, tmp_path_factory) -> Path:
    """A Wanda plan of :func:`model`, made with the command line."""
    out = tmp_path_factory.mktemp("plan") / "plan"
    r = invoke(["plan", model, "--calib", model / "calib.jsonl", "--method", "wanda", "--nsamples", "2", "--out", out,
                "-q"])
    assert r.exit_code == 0, r.output
    return out


def front_matter(card: str) -> tuple[dict, str]:
    """A card's YAML front matter, parsed by hand (``key: value``, JSON-quoted strings, ``- item``
    lists), and the text after it."""
    lines = card.splitlines()
    assert lines[0] == "---", card[:200]
    end = lines.index("---", 1)
    header: dict = {}
    key = None
    for line in lines[1:end]:
        if line.startswith("- "):
            header[key].append(line[2:])
        else:
            key, _, value = line.partition(":")
            value = value.strip()
            header[key] = json.loads(value) if value.startswith('"') else value or []
    return header, "\n".join(lines[end + 1:])


def test_apply_records_the_plan_and_the_sparsity_it_wrote(model, plan_dir, tmp_path):
    out = tamp_fx.apply(model, plan_dir, tmp_path / "out")
    record = json.loads((out / PROVENANCE_FILE).read_text())
    plan = Plan.load(plan_dir)
    written = checkpoint_tensors(out)
    zeros = sum(int((written[name] == 0).sum()) for name in plan.linears)
    total = sum(written[name].numel() for name in plan.linears)
    sparsity = record["sparsity"]
    assert sparsity["achieved"] == round(zeros / total, 6) and sparsity["parameters"] == total
    assert sparsity["achieved"] > sparsity["planned"] == plan.summary()["sparsity"], "measured, not the plan's"
    assert sparsity["target"] == plan.config.sparsity == 0.5
    assert record["method"] == "wanda"
    assert record["parts"] == {"allocation": "uniform", "score": "wanda", "tokens": "all"}
    assert record["config"] == plan.config.to_dict()
    assert record["structure"] == {"pattern": "unstructured", "format": "dense", "quantize": None}
    assert record["model"]["fingerprint"] == plan.model["fingerprint"]
    assert record["calibration"] == {**plan.model["calibration"], "nsamples": 2, "seqlen": 512, "seed": 0}
    assert record["command"] == PYTHON_API and record["tamp_fx_version"] == tamp_fx.__version__
    assert record["input_model"] == str(model.resolve()) and record["plan"] == str(plan_dir)
    assert datetime.date.fromisoformat(record["date"]) <= datetime.datetime.now(datetime.timezone.utc).date()

    header, body = front_matter((out / "README.md").read_text())
    assert header == {"base_model": model.name, "library_name": "transformers", "tags": ["tamp-fx", "pruned", "sparse"]}
    assert CARD_SECTION in body and f"{sparsity['achieved']:.2%}" in body and plan.model["fingerprint"] in body
    assert all(line in body for line in record["reproduce"])


def test_the_output_loads_with_from_pretrained_and_its_config_is_the_inputs(model, plan_dir, tmp_path):
    out = tamp_fx.apply(model, plan_dir, tmp_path / "out")
    assert (out / "config.json").read_bytes() == (model / "config.json").read_bytes()
    config = transformers.AutoConfig.from_pretrained(out)
    net = getattr(transformers, config.architectures[0]).from_pretrained(out)
    params, written, plan = dict(net.named_parameters()), checkpoint_tensors(out), Plan.load(plan_dir)
    assert all(torch.equal(params[lp.module_name], written[name]) for name, lp in plan.linears.items())


def test_an_input_card_gets_the_section_appended_and_stays_as_it_was(model, plan_dir, tmp_path):
    own = Path(shutil.copytree(model, tmp_path / "model"))
    text = "---\nlicense: mit\n---\n\n# A model\n\nIts own card, without a final newline."
    (own / "README.md").write_text(text)
    before = snapshot(own)
    out = tamp_fx.apply(own, plan_dir, tmp_path / "out")
    assert snapshot(own) == before, "the input changed"
    card = (out / "README.md").read_text()
    assert card.startswith(text + "\n\n" + CARD_SECTION + "\n") and card.count(CARD_SECTION) == 1


def test_the_recorded_plan_command_makes_the_same_plan(model, plan_dir, tmp_path, monkeypatch):
    out = tamp_fx.apply(model, plan_dir, tmp_path / "out")
    args = shlex.split(json.loads((out / PROVENANCE_FILE).read_text())["reproduce"][0], comments=True)
    assert args[:2] == ["tamp-fx", "plan"]
    args[args.index("--out") + 1] = str(tmp_path / "again")
    monkeypatch.chdir(model)                                   # the calibration file is recorded by name
    r = invoke([*args[1:], "-q"])
    assert r.exit_code == 0, r.output
    again, first = (json.loads((d / "plan.json").read_text()) for d in (tmp_path / "again", plan_dir))
    assert without_run_measurements(again) == without_run_measurements(first)
    assert (tmp_path / "again" / "masks.safetensors").read_bytes() == (plan_dir / "masks.safetensors").read_bytes()


@pytest.mark.parametrize("config", [
    tamp_fx.PlanConfig(method="tamp", sparsity=0.6, nsamples=8, seqlen=64, seed=3),
    tamp_fx.PlanConfig(method="wanda", allocation="owl", tokens="atv", atv_alpha=2.0),
    tamp_fx.PlanConfig(method="das", pattern="2:4", sparsity=0.4, max_sparsity_delta=0.2),
    tamp_fx.PlanConfig(method="magnitude", pattern="4:8"),
])
@pytest.mark.parametrize("dtype", [None, "float32", "bfloat16"])
def test_the_plan_command_line_gives_the_config_back(config, dtype):
    args = shlex.split(plan_command(config, "model", "calib.jsonl", "plan", dtype), comments=True)
    command = typer.main.get_command(app).get_command(None, "plan")
    params = command.make_context("plan", args[2:]).params          # the real options, parsed as the CLI does
    fields = {f.name for f in dataclasses.fields(tamp_fx.PlanConfig)}
    given = {k: v.value if isinstance(v, Enum) else v for k, v in params.items() if k in fields}
    assert tamp_fx.PlanConfig(**given) == config
    assert params["dtype"] == dtype


def test_the_reproduce_line_plans_in_the_dtype_the_plan_ran_in(model, plan_dir, tmp_path):
    """Another machine's default dtype may differ (bfloat16 only where the hardware has it): the line
    names the one recorded; a plan without that record (older, or edited) gives none."""
    ran = json.loads((plan_dir / "plan.json").read_text())["timing"]["dtype"]
    assert ran in ("float32", "bfloat16")
    line = json.loads((tamp_fx.apply(model, plan_dir, tmp_path / "out") / PROVENANCE_FILE).read_text())["reproduce"][0]
    assert f" --dtype {ran} --out " in line
    for n, timing in enumerate([None, {"wall_s": 1.0, "parts_s": {}, "dtype": "float64; rm -rf"}]):
        edited = Path(shutil.copytree(plan_dir, tmp_path / f"plan{n}"))
        data = json.loads((edited / "plan.json").read_text())
        data.pop("timing") if timing is None else data.update(timing=timing)
        (edited / "plan.json").write_text(json.dumps(data))
        line = json.loads((tamp_fx.apply(model, edited, tmp_path / f"out{n}") / PROVENANCE_FILE).read_text())["reproduce"][0]
        assert "--dtype" not in line


def test_settings_the_command_line_does_not_take_are_named():
    line = plan_command(tamp_fx.PlanConfig(method="owl", owl_m=3.0), "model", "calib.jsonl", "plan")
    assert line.endswith("# and owl_m=3.0 (tamp_fx.PlanConfig)")


def test_the_command_line_is_recorded(model, plan_dir, tmp_path, monkeypatch):
    argv = ["/somewhere/bin/tamp-fx", "apply", str(model), str(plan_dir), "--out", str(tmp_path / "out")]
    monkeypatch.setattr("sys.argv", argv)
    r = invoke(argv[1:])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "out" / PROVENANCE_FILE).read_text())["command"] == ["tamp-fx", *argv[1:]]


def test_int8_weight_records_the_quantization_and_appends_one_section(model, plan_dir, tmp_path):
    pytest.importorskip("torchao")
    own = Path(shutil.copytree(model, tmp_path / "model"))
    (own / "README.md").write_text("# A model\n")
    out = tamp_fx.apply(own, plan_dir, tmp_path / "out", quantize="int8-weight")
    record = json.loads((out / PROVENANCE_FILE).read_text())
    assert record["structure"]["quantize"] == "int8-weight"
    assert record["reproduce"][1].endswith("--quantize int8-weight")
    assert record["sparsity"]["achieved"] > record["sparsity"]["planned"]
    card = (out / "README.md").read_text()
    assert card.startswith("# A model\n\n" + CARD_SECTION) and card.count(CARD_SECTION) == 1


@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_outputs_get_the_modes_the_umask_gives(umask, file_mode, dir_mode, model, plan_dir, tmp_path):
    own = Path(shutil.copytree(model, tmp_path / "model"))
    (own / "extra").mkdir()
    (own / "extra" / "notes.txt").write_text("kept\n")
    (own / "README.md").write_text("# A model\n")
    for path, mode in ((own / "README.md", 0o600), (own / "config.json", 0o644), (own / "extra", 0o755)):
        path.chmod(mode)              # a copy must not keep its source's mode, private or not
    old = os.umask(umask)
    try:
        out = tamp_fx.apply(own, plan_dir, tmp_path / "out")
    finally:
        os.umask(old)
    modes = {str(p.relative_to(tmp_path)): p.stat().st_mode & 0o777 for p in [out, *out.rglob("*")]}
    expected = {str(p.relative_to(tmp_path)): dir_mode if p.is_dir() else file_mode for p in [out, *out.rglob("*")]}
    assert {"out/README.md", "out/config.json", "out/extra/notes.txt", f"out/{PROVENANCE_FILE}"} <= modes.keys()
    assert modes == expected


def test_an_edited_calibration_record_gives_a_placeholder_not_a_crash(model, plan_dir, tmp_path):
    """Found by the damaged-plan fuzz: a plan.json whose calibration file is not a string (true) made
    the reproduce line fail in shlex; apply records the placeholder instead."""
    import shutil
    edited = tmp_path / "plan"
    shutil.copytree(plan_dir, edited)
    data = json.loads((edited / "plan.json").read_text())
    data["model"]["calibration"]["file"] = True
    (edited / "plan.json").write_text(json.dumps(data))
    out = tamp_fx.apply(model, edited, tmp_path / "out")
    record = json.loads((out / PROVENANCE_FILE).read_text())
    assert " --calib CALIB " in record["reproduce"][0]
