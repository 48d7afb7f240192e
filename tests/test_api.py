"""The Python API as a first-time user meets it: a plan that prints in a line, progress bars on
request, a record of how long planning took, and no warnings of tamp-fx's dependencies."""
from __future__ import annotations

import inspect
import subprocess
import sys

import pytest

import tamp_fx

CONFIG = tamp_fx.PlanConfig(method="wanda", sparsity=0.5, nsamples=2)


@pytest.fixture(scope="module")
def llama(tiny_models):
    return tiny_models("llama")


@pytest.fixture(scope="module")
def plan(llama):
    return tamp_fx.plan(llama, llama / "calib.jsonl", CONFIG)


def test_a_plan_prints_in_one_short_line(plan):
    text = repr(plan)
    assert len(text) < 300 and "\n" not in text
    assert "'wanda'" in text and f"{len(plan.linears)} linears" in text
    assert plan.model["fingerprint"][:19] in text


def test_a_plan_records_its_wall_time_stages_and_placement(plan, tmp_path):
    parts = plan.timing["parts_s"]
    stages = {"load", "capture", "trace", "layer forwards", "statistics", "pruning", "prune"}
    assert stages <= parts.keys() and "profile" not in parts   # wanda: no dense profile
    assert (plan.timing["device"], plan.timing["dtype"]) == ("cpu", "float32")
    assert plan.wall_seconds > 0 and sum(parts.values()) == pytest.approx(plan.wall_seconds, abs=0.01)
    again = tamp_fx.Plan.load(plan.save(tmp_path / "p"))         # writing is part of the record, saved and shown
    assert again.timing == plan.timing and again.timing_text == plan.timing_text
    assert "writing" in plan.timing["parts_s"] and plan.wall_seconds == pytest.approx(sum(plan.timing["parts_s"].values()), abs=0.01)
    assert plan.timing_text.startswith(f"{plan.wall_seconds:.1f} s on cpu in float32, peak host memory ")
    assert " MiB (load " in plan.timing_text and plan.timing["peak_host_mib"] > 0


def test_the_peak_memory_a_plan_records_is_the_whole_runs_and_the_kernels(llama):
    """The plan records the whole run's peak, and leaves the kernel's mark alone: ``getrusage``
    (and ``/usr/bin/time``) still see a peak reached before the plan's layers (a per-layer reset
    of the mark hid it from them)."""
    import resource

    import torch

    from tamp_fx.runtime.memory import resident_mib as resident
    resident_mib = resident()
    if resident_mib is None:
        pytest.skip("reads Linux's /proc/self/statm")
    spike = torch.ones(2**28)                      # 1 GiB, touched, before the plan's layers
    del spike
    plan = tamp_fx.plan(llama, llama / "calib.jsonl", CONFIG)
    assert plan.timing["peak_host_mib"] >= resident_mib + 1000
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 >= resident_mib + 1000     # KiB on Linux
    assert all(entry["peak_host_mib"] >= resident_mib + 1000 for entry in plan.layers)


def test_a_layers_statistics_are_freed_without_the_garbage_collector(llama):
    """The observers of a planned layer (SparseGPT: a Hessian per input) go with the layer, not at
    the next collection: they used to pile up, 13 MiB a layer on SmolLM2."""
    import gc

    from tamp_fx.statistics.hessian import HessianAccumulator
    gc.collect()
    gc.disable()
    try:
        tamp_fx.plan(llama, llama / "calib.jsonl", tamp_fx.PlanConfig(method="sparsegpt", sparsity=0.5, nsamples=2))
        left = sum(isinstance(o, HessianAccumulator) for o in gc.get_objects())
    finally:
        gc.enable()
    assert left == 0


def test_progress_only_on_request(llama, capsys):
    tamp_fx.plan(llama, llama / "calib.jsonl", CONFIG)
    assert capsys.readouterr().err == ""           # the library's default: silent
    tamp_fx.plan(llama, llama / "calib.jsonl", CONFIG, progress=True)
    captured = capsys.readouterr()                 # stderr is no terminal here: a plain line per layer
    assert "prune 2/2: layer 1" in captured.err and captured.out == ""


def test_apply_takes_the_plan_as_plan():
    assert list(inspect.signature(tamp_fx.apply).parameters)[:3] == ["model", "plan", "out"]


_SCRIPT = """
import logging, sys, warnings
import tamp_fx
tamp_fx.plan(sys.argv[1], sys.argv[1] + "/calib.jsonl", tamp_fx.PlanConfig(method="wanda", nsamples=2))
import torchao  # noqa: F401 - imported by the user after planning: still no noise
logging.getLogger("mine").warning("my own log warning")
warnings.warn("my own warning")
"""


def test_planning_shows_no_dependency_warnings_but_the_users_own(llama):
    """In a fresh interpreter, as torchao warns once, on import."""
    pytest.importorskip("torchao")
    result = subprocess.run([sys.executable, "-c", _SCRIPT, str(llama)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "my own log warning" in result.stderr and "my own warning" in result.stderr
    noise = [line for line in lines if any(word in line for word in ("torchao", "pytree", "Enum", "cpp extensions"))]
    assert not noise, result.stderr
