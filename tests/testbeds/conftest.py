"""Shared by the tests of both fixtures: SmolLM2's presence, loading a built fixture, and the
check that the language model is SmolLM2's shipped weights plus the merged LoRA."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def smollm2_present():
    from tamp_fx.errors import TampError
    from tamp_fx.testbeds.demo import smollm2_gguf
    try:
        smollm2_gguf()
    except TampError as error:
        pytest.skip(str(error))


@pytest.fixture(scope="session")
def load_built():
    """path -> (model, processor), through tamp-fx's own loader."""
    def load(path):
        from tamp_fx.load.source import load_model, load_processor, resolve_source
        source = resolve_source(path)
        net = load_model(source)
        return net, load_processor(source, net.config)
    return load


@pytest.fixture(scope="session")
def assert_shipped_plus_lora():
    """(model, weights file) -> None: every language-model weight is the GGUF's, plus
    (alpha / r) B A where the weights file holds a LoRA for it."""
    def check(net, weights):
        from safetensors.torch import load_file

        from tamp_fx.testbeds.fixture import model as fixture1
        lm, _ = fixture1.smollm2()
        trained = load_file(weights)
        ours = net.model.language_model.state_dict()
        for name, shipped in lm.model.state_dict().items():
            module = name.rsplit(".", 1)[0]
            if f"lora.{module}.A" in trained:
                a, b = trained[f"lora.{module}.A"].float(), trained[f"lora.{module}.B"].float()
                expected = shipped + (fixture1.LORA_ALPHA / fixture1.LORA_RANK) * (b @ a)
                torch.testing.assert_close(ours[name], expected, rtol=0, atol=1e-6)
            else:
                assert torch.equal(ours[name], shipped), f"{name} differs from the GGUF"
    return check
