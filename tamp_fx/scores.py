"""Importance scores of weights, registered by name: higher means keep."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from tamp_fx.observers import LinearObserver


@dataclass(frozen=True)
class Score:
    name: str
    group: str                  # comparison group of the mask: "matrix" or "row"
    needs_activations: bool     # whether calibration data must flow through the layer
    fn: Callable[[torch.Tensor, LinearObserver | None], torch.Tensor]


def _magnitude(weight: torch.Tensor, observer: LinearObserver | None) -> torch.Tensor:
    return weight.detach().float().abs()                                  # (C_out, C_in)


def _wanda(weight: torch.Tensor, observer: LinearObserver | None) -> torch.Tensor:
    if observer is None:
        raise ValueError("wanda needs the input statistics of an observer")
    norm = observer.input_norm().to(weight.device)                        # (C_in,)
    return weight.detach().float().abs() * norm[None, :]                   # (C_out, C_in)


SCORES: dict[str, Score] = {
    "magnitude": Score("magnitude", "matrix", False, _magnitude),
    "wanda": Score("wanda", "row", True, _wanda),
}
