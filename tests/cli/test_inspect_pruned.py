"""`tamp-fx inspect` on a model written by `tamp-fx apply`: what its tamp-fx.json records, as
lines or (--json) as the JSON itself; a directory that is neither a plan nor a pruned model is
refused in one line."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from support.cli import fails_cleanly, invoke
from tamp_fx.write.provenance import PROVENANCE_FILE


@pytest.fixture(scope="module")
def pruned(tiny_models, tmp_path_factory) -> Path:
    """The tiny llama pruned by a 2:4 magnitude plan, through the command line."""
    model, root = tiny_models("llama"), tmp_path_factory.mktemp("pruned")
    for args in (["plan", model, "--calib", model / "calib.jsonl", "--method", "magnitude", "--pattern", "2:4",
                  "--nsamples", "2", "--out", root / "plan"], ["apply", model, root / "plan", "--out", root / "out"]):
        r = invoke([*args, "-q"])
        assert r.exit_code == 0, r.output
    return root / "out"


def test_inspect_prints_what_a_pruned_model_records(pruned):
    record = json.loads((pruned / PROVENANCE_FILE).read_text())
    r = invoke(["inspect", pruned])
    assert r.exit_code == 0, r.output
    lines = {line.split(maxsplit=1)[0]: line for line in r.output.splitlines()[1:]}
    assert "magnitude" in lines["method"] and "pattern 2:4" in lines["structure"]
    assert f"achieved {record['sparsity']['achieved']:.2%}" in lines["sparsity"]
    assert record["model"]["fingerprint"] in lines["model"] and "calib.jsonl" in lines["calibration"]
    assert all(line in r.output for line in record["reproduce"]), "each reproduce line whole, to copy"


def test_inspect_json_prints_the_record(pruned):
    r = invoke(["inspect", pruned, "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output) == json.loads((pruned / PROVENANCE_FILE).read_text())


def test_a_directory_that_is_neither_a_plan_nor_a_pruned_model_is_refused(tiny_models, tmp_path):
    (tmp_path / "empty").mkdir()
    for directory in (tmp_path / "empty", tiny_models("llama"), tmp_path / "missing"):
        fails_cleanly(["inspect", directory], "is neither a plan", unchanged=[tmp_path])


def test_plot_of_a_pruned_model_is_refused(pruned, tmp_path):
    fails_cleanly(["inspect", pruned, "--plot", tmp_path / "fig"], "draw a plan", tmp_path / "fig")


def test_a_damaged_record_is_refused_in_one_line(pruned, tmp_path):
    damaged = tmp_path / "out"
    damaged.mkdir()
    for text, expected in (("{", "not valid JSON"), ("[1]", "holds a list")):
        (damaged / PROVENANCE_FILE).write_text(text)
        fails_cleanly(["inspect", damaged], expected)
