"""Decoder layers of an exported program found by structure (tamp_fx/program.py)."""
from __future__ import annotations

import pytest
import torch

from tamp_fx.calibrate.program import ProgramSample
from tamp_fx.capture.program import capture_program_inputs, program_layout
from tamp_fx.errors import TampError


class Block(torch.nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.a = torch.nn.Linear(width, 2 * width)
        self.b = torch.nn.Linear(2 * width, width)

    def forward(self, scale: torch.Tensor, x: torch.Tensor) -> torch.Tensor:   # hidden states second
        return x + self.b(torch.relu(self.a(x))) * scale


class Toy(torch.nn.Module):
    """Chained blocks under an unremarkable name, beside two same-shaped parallel heads (not chained)."""

    def __init__(self, width: int = 8, depth: int = 3) -> None:
        super().__init__()
        self.zz = torch.nn.ModuleList(Block(width) for _ in range(depth))
        self.head_one = torch.nn.Linear(width, width)
        self.head_two = torch.nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = x.mean() * 0 + 0.5
        for block in self.zz:
            x = block(scale, x)
        return self.head_one(x) + self.head_two(x)


def test_layers_are_found_by_structure_and_run_as_the_program_does():
    torch.manual_seed(0)
    toy = Toy().eval()
    x = torch.randn(1, 5, 8)
    ep = torch.export.export(toy, (x,), strict=False)
    layout = program_layout(ep)
    assert layout.names == ("zz.0", "zz.1", "zz.2") and layout.hidden_index == 1
    samples = [ProgramSample((torch.randn(1, 5, 8),), torch.tensor([0, 1, 1, 0, 0], dtype=torch.int8))]
    acts = capture_program_inputs(layout, samples)
    hidden = acts.hidden[0]
    with torch.no_grad():
        for i, layer in enumerate(layout.layers):               # flat graphs, hidden states first
            hidden = layer(hidden, **acts.layer_kwargs[0][i])
        expected = samples[0].args[0]
        scale = expected.mean() * 0 + 0.5
        for block in toy.zz:
            expected = block(scale, expected)
    assert torch.equal(hidden, expected)
    assert sorted(n for n, _ in layout.layers[0].named_parameters()) == ["a.bias", "a.weight", "b.bias", "b.weight"]
    assert acts.labels[0].tolist() == [0, 1, 1, 0, 0]
    assert isinstance(layout.root.get_submodule("zz.0"), torch.nn.Module)   # the program's layers are back


def test_a_program_without_repeated_chained_layers_is_refused_in_one_line():
    heads = torch.nn.ModuleDict({"one": torch.nn.Linear(8, 8), "two": torch.nn.Linear(8, 8)})

    class Parallel(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.heads = heads

        def forward(self, x):
            return self.heads["one"](x) + self.heads["two"](x)

    ep = torch.export.export(Parallel(), (torch.randn(1, 3, 8),), strict=False)
    with pytest.raises(TampError) as info:
        program_layout(ep, "p.pt2")
    assert "found no decoder layers in p.pt2: looked for" in str(info.value) and "\n" not in str(info.value)
