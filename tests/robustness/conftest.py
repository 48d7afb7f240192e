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
