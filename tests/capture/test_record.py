"""The one recorder of a model's calls: what it records, what it answers, that it stops where asked
and that the model is whole again afterwards, whatever happened."""
from __future__ import annotations

import doctest

import pytest
import torch

from tamp_fx.capture import record
from tamp_fx.capture.record import Recorder, recording, run


class Layer(torch.nn.Linear):
    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return super().forward(x) * scale


class Chain(torch.nn.Module):
    """Three layers called one after the other (as decoder layers are), then a head that counts its calls."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(Layer(3, 3) for _ in range(3))
        self.head = torch.nn.Linear(3, 2)
        self.head_calls = 0

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, scale=scale)
        self.head_calls += 1
        return self.head(x)


def test_the_module_examples_run():
    assert doctest.testmod(record).failed == 0


def test_every_call_is_recorded_in_order_and_hidden_states_pass_through():
    net, x = Chain(), torch.randn(1, 3)
    names = [f"layers.{i}" for i in range(3)]
    with recording(net, names) as calls:
        out = net(x, scale=2.0)
    assert [kwargs for _, kwargs in calls] == [{"scale": 2.0}] * 3
    assert all(args[0] is x for args, _ in calls)                      # passed through, untouched
    assert torch.equal(out, net.head(x)) and net.head_calls == 1


def test_stop_ends_the_forward_at_the_last_recorder_and_respond_can_run_the_module():
    net, x = Chain(), torch.randn(1, 3)
    with recording(net, ["layers.0", "layers.2"], respond=lambda m, a, k: m(a[0]), stop=True) as calls:
        run(net, x)
    assert len(calls) == 2 and net.head_calls == 0
    assert torch.allclose(calls[1][0][0], net.layers[1](net.layers[0](x)))   # layer 0 ran, then layer 1


def test_the_model_is_restored_even_when_the_forward_fails_and_attributes_reach_the_original():
    net = Chain()
    originals = list(net.layers)
    with pytest.raises(RuntimeError), recording(net, ["layers.1"]):
        assert net.layers[1].in_features == 3                            # asked of the stand-in, answered by the layer
        net(torch.randn(1, 4))                                           # wrong width: layer 0 fails
    assert list(net.layers) == originals and not any(isinstance(m, Recorder) for m in net.modules())
