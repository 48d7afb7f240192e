from __future__ import annotations

import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def llama(tiny_models) -> Path:
    return tiny_models("llama")


@pytest.fixture(scope="session")
def llava(tiny_models) -> Path:
    return tiny_models("llava")


@pytest.fixture(scope="session")
def saved_plan(llama, tmp_path_factory) -> Path:
    """A SparseGPT plan of the tiny llama (masks and reconstructed weights), made once."""
    import tamp_fx
    out = tmp_path_factory.mktemp("plans") / "sparsegpt"
    tamp_fx.plan(llama, llama / "calib.jsonl", tamp_fx.PlanConfig(method="sparsegpt", nsamples=4)).save(out)
    return out


@pytest.fixture
def plan_copy(saved_plan, tmp_path) -> Path:
    """A fresh copy of :func:`saved_plan` that a test may damage."""
    return Path(shutil.copytree(saved_plan, tmp_path / "plan"))


@pytest.fixture(scope="session")
def program(llama, tmp_path_factory) -> tuple[Path, Path]:
    """The tiny llama's decoder exported (model.pt2) and its calibration inputs (inputs.safetensors), made once."""
    from support.cli import invoke
    out = tmp_path_factory.mktemp("program")
    result = invoke(["export", llama, "--calib", llama / "calib.jsonl", "--out", out / "model.pt2",
                     "--calib-out", out / "inputs.safetensors", "--nsamples", 2, "-q"])
    assert result.exit_code == 0, result.output
    return out / "model.pt2", out / "inputs.safetensors"


@pytest.fixture
def ws(tmp_path, request):
    """A :class:`support.cases.Workspace` in ``tmp_path``."""
    from support.cases import Workspace
    return Workspace(tmp_path, request)
