"""How a linear is pruned once its statistics are in: a mask, and for SparseGPT new weights.

Registered by name; each names its comparison group (where the sparsity is exact) and the
input statistics it needs.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from tamp_fx.masks import keep_mask
from tamp_fx.observers import InputStats
from tamp_fx.sparsegpt import sparsegpt_prune

#: (weight (C_out, C_in), input statistics or None, sparsity) -> (keep-mask, new weight or None)
Decide = Callable[[torch.Tensor, "InputStats | None", float], "tuple[torch.Tensor, torch.Tensor | None]"]

SPARSEGPT_BLOCK = 128


@dataclass(frozen=True)
class Score:
    name: str
    group: str                  # comparison group of the mask: "matrix", "row", "block128"
    needs_activations: bool     # whether calibration data must flow through the layer
    needs_hessian: bool
    decide: Decide


def _magnitude(weight, stats, sparsity):
    return keep_mask(weight.detach().float().abs(), sparsity, "matrix"), None                  # (C_out, C_in)


def _wanda(weight, stats, sparsity):
    norm = stats.input_norm().to(weight.device)                                                # (C_in,)
    return keep_mask(weight.detach().float().abs() * norm[None, :], sparsity, "row"), None


def _sparsegpt(weight, stats, sparsity):
    new_weight, mask = sparsegpt_prune(weight.detach(), stats.hessian().to(weight.device), sparsity,
                                       blocksize=SPARSEGPT_BLOCK)
    return mask, new_weight


SCORES: dict[str, Score] = {
    "magnitude": Score("magnitude", "matrix", False, False, _magnitude),
    "wanda": Score("wanda", "row", True, False, _wanda),
    "sparsegpt": Score("sparsegpt", f"block{SPARSEGPT_BLOCK}", True, True, _sparsegpt),
}
