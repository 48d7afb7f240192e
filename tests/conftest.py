from __future__ import annotations

import os

import pytest

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# plans' default dtype is bfloat16 on CPUs that compute it natively: the tests pin float32, so that
# their plans (and references) do not depend on the machine's instruction set (tests/runtime/test_placement.py
# checks the native default itself)
os.environ["TAMP_FX_DTYPE"] = "float32"


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Build each tiny family once per session: family -> model directory."""
    from tamp_fx.testbeds.tiny import build_tiny
    root = tmp_path_factory.mktemp("tiny")
    cache: dict[str, object] = {}

    def get(family: str, seed: int = 0):
        key = f"{family}-{seed}"
        if key not in cache:
            cache[key] = build_tiny(family, root / key, seed=seed)
        return cache[key]
    return get
