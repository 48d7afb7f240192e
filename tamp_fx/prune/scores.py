"""How a linear is pruned once its statistics are in: a mask, and for SparseGPT new weights.

Registered by name; each names its comparison group (where the sparsity is exact) and the
input statistics it needs. Given ``nm=(N, M)`` every score prunes N:M instead (N lowest in each
block of M input columns of every row; the sparsity is then N/M).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from tamp_fx.prune.masks import keep_mask, nm_keep_mask
from tamp_fx.prune.sparsegpt import sparsegpt_prune
from tamp_fx.registry import Registry

if TYPE_CHECKING:
    from tamp_fx.statistics.observers import InputStats

#: (weight (C_out, C_in), input statistics or None, sparsity, (N, M) or None) -> (keep-mask, new weight or None)
Decide = Callable[[torch.Tensor, "InputStats | None", float, "tuple[int, int] | None"],
                  "tuple[torch.Tensor, torch.Tensor | None]"]

SPARSEGPT_BLOCK = 128


@dataclass(frozen=True)
class Score:
    name: str
    group: str                  # comparison group of the mask: "matrix", "row", "block128"
    needs_activations: bool     # whether calibration data must flow through the layer
    needs_hessian: bool
    decide: Decide


def _mask(scores: torch.Tensor, sparsity: float, group: str, nm: tuple[int, int] | None) -> torch.Tensor:
    """Keep-mask (C_out, C_in) of ``scores`` (C_out, C_in): exact per ``group``, or N:M."""
    return keep_mask(scores, sparsity, group) if nm is None else nm_keep_mask(scores, *nm)


def _magnitude(weight, stats, sparsity, nm=None):
    return _mask(weight.detach().float().abs(), sparsity, "matrix", nm), None                  # (C_out, C_in)


def _wanda(weight, stats, sparsity, nm=None):
    norm = stats.input_norm().to(weight.device)                                                # (C_in,)
    return _mask(weight.detach().float().abs() * norm[None, :], sparsity, "row", nm), None


def _sparsegpt(weight, stats, sparsity, nm=None):
    n, m = nm or (0, 0)
    blocksize = SPARSEGPT_BLOCK if nm is None else m * max(1, SPARSEGPT_BLOCK // m)  # N:M needs m | blocksize
    new_weight, mask = sparsegpt_prune(weight.detach(), stats.hessian().to(weight.device),
                                       sparsity if nm is None else n / m, blocksize=blocksize, prune_n=n, prune_m=m)
    return mask, new_weight


SCORES: Registry[Score] = Registry("score")
SCORES.register(Score("magnitude", "matrix", False, False, _magnitude))
SCORES.register(Score("wanda", "row", True, False, _wanda))
SCORES.register(Score("sparsegpt", f"block{SPARSEGPT_BLOCK}", True, True, _sparsegpt))
