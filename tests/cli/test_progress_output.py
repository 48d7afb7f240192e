"""Progress where stderr is no terminal (a log file; pytest's CliRunner): one plain line per finished
layer with its elapsed time, ETA and peak memory; the closing lines, on stdout, name the output
and the command to run next."""
from __future__ import annotations

import json
import re

import pytest

from support.cli import invoke


@pytest.fixture(autouse=True)
def _no_forced_terminal(monkeypatch):
    for name in ("FORCE_COLOR", "TTY_COMPATIBLE"):     # either makes rich take stderr for a terminal
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize("log_format", [[], ["--log-format", "plain"]])
def test_plan_prints_a_line_per_layer_and_what_to_run_next(tiny_models, tmp_path, log_format):
    model = tiny_models("llama")
    out = tmp_path / "plan"
    r = invoke(["plan", model, "--calib", model / "calib.jsonl", "--out", out, "--nsamples", "2", *log_format])
    assert r.exit_code == 0, r.output
    n = json.loads((out / "plan.json").read_text())["model"]["num_layers"]
    layers = [line for line in r.stderr.splitlines() if line.startswith("prune ")]
    assert len(layers) == n, r.stderr
    for k, line in enumerate(layers, 1):
        assert re.fullmatch(rf"prune {k}/{n}: layer {k - 1}, \d+\.\d s, peak host [\d,]+ MiB \([\d,]+ now\); "
                            r"\d+:\d\d:\d\d elapsed, ETA (\d+:\d\d:\d\d|-:--:--)", line), line
    assert re.search(r"^write plan 1/1 in \d+\.\d s; \d+:\d\d:\d\d elapsed, ETA 0:00:00$", r.stderr, re.M), r.stderr
    assert "━" not in r.output                          # no bars
    stdout = r.stdout.splitlines()
    assert f"plan written to {out}" in stdout            # whole lines: nothing folded
    assert f"next: tamp-fx inspect {out}" in stdout
    assert f"      tamp-fx apply {model} {out} --out pruned/" in stdout
    assert all(len(line) <= 80 for line in stdout if str(tmp_path) not in line and str(model) not in line)


def test_apply_names_its_output_and_eval_next(tiny_models, tmp_path):
    model = tiny_models("llama")
    plan, out = tmp_path / "plan", tmp_path / "pruned"
    planned = invoke(["plan", model, "--calib", model / "calib.jsonl", "--out", plan, "--nsamples", "2", "-q"])
    assert planned.exit_code == 0, planned.output
    r = invoke(["apply", model, plan, "--out", out])
    assert r.exit_code == 0, r.output
    assert re.search(r"^write shards \d+/\d+ in \d+\.\d s", r.stderr, re.M), r.stderr
    assert f"pruned model written to {out}" in r.stdout.splitlines()
    assert f"next: tamp-fx eval {out} --text FILE.txt" in r.stdout.splitlines()


def test_quiet_prints_no_progress_and_verbose_logs_the_steps(tiny_models, tmp_path):
    model = tiny_models("llama")
    r = invoke(["plan", model, "--calib", model / "calib.jsonl", "--out", tmp_path / "q", "--nsamples", "2", "-q"])
    assert r.exit_code == 0, r.output
    assert "capture decoder inputs" not in r.stderr and "prune " not in r.stderr and "plan written to" in r.stdout
    r = invoke(["plan", model, "--calib", model / "calib.jsonl", "--out", tmp_path / "v", "--nsamples", "2", "-v"])
    assert r.exit_code == 0, r.output
    assert re.search(r"^INFO: \S+: \d+ decoder layers \(read layer by layer\), 2 calibration samples$", r.stderr, re.M)
    assert "prune 1/" in r.stderr


def test_inspect_json_and_quiet(tiny_models, tmp_path):
    model = tiny_models("llama")
    plan = tmp_path / "plan"
    assert invoke(["plan", model, "--calib", model / "calib.jsonl", "--out", plan, "--method", "magnitude",
                   "--sparsity", "0.3", "--nsamples", "1", "-q"]).exit_code == 0
    r = invoke(["inspect", plan, "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    saved = json.loads((plan / "plan.json").read_text())
    assert [entry["layer"] for entry in report["layers"]] == list(range(saved["model"]["num_layers"]))
    assert all(entry["sparsity"] == pytest.approx(0.3, abs=0.01) and len(entry["linears"]) == 7
               for entry in report["layers"])
    assert report["sparsity"] == pytest.approx(saved["summary"]["sparsity"])
    r = invoke(["inspect", plan, "-q"])
    assert r.exit_code == 0 and r.output == "", r.output
