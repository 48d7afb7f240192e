"""How a linear is pruned once its statistics are in: a mask, and for SparseGPT new weights.

Registered by name; each names its comparison group (where the sparsity is exact) and the
input statistics it needs. A score decides for the linears that share one input statistic at once
(q/k/v, gate/up; one linear where nothing is shared): SparseGPT prunes them in one sweep. Given
``nm=(N, M)`` every score prunes N:M instead (N lowest in each block of M input columns of every
row; the sparsity is then N/M).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from tamp_fx.prune.masks import keep_mask, nm_keep_mask
from tamp_fx.prune.sparsegpt import sparsegpt_prune_shared
from tamp_fx.registry import Registry

if TYPE_CHECKING:
    from tamp_fx.statistics.observers import InputStats

#: (weights [(C_out_k, C_in)] of linears that read one input, their shared input statistics or None,
#: a sparsity per weight, (N, M) or None) -> per weight (keep-mask, new weight or None)
Decide = Callable[[Sequence[torch.Tensor], "InputStats | None", Sequence[float], "tuple[int, int] | None"],
                  "list[tuple[torch.Tensor, torch.Tensor | None]]"]

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


def _each(rule: Callable[..., tuple[torch.Tensor, None]]) -> Decide:
    """A score that decides each linear on its own (its mask from its weight and the statistics)."""
    def decide(weights, stats, sparsities, nm=None):
        return [rule(weight, stats, sparsity, nm) for weight, sparsity in zip(weights, sparsities)]
    return decide


def _magnitude(weight, stats, sparsity, nm=None):
    return _mask(weight.detach().float().abs(), sparsity, "matrix", nm), None                  # (C_out, C_in)


def _wanda(weight, stats, sparsity, nm=None):
    norm = stats.input_norm().to(weight.device)                                                # (C_in,)
    return _mask(weight.detach().float().abs() * norm[None, :], sparsity, "row", nm), None


def _sparsegpt(weights, stats, sparsities, nm=None):
    n, m = nm or (0, 0)
    blocksize = SPARSEGPT_BLOCK if nm is None else m * max(1, SPARSEGPT_BLOCK // m)  # N:M needs m | blocksize
    pruned = sparsegpt_prune_shared([w.detach() for w in weights], stats.hessian().to(weights[0].device),
                                    sparsities if nm is None else [n / m] * len(weights),
                                    blocksize=blocksize, prune_n=n, prune_m=m)
    return [(mask, new_weight) for new_weight, mask in pruned]


SCORES: Registry[Score] = Registry("score")
SCORES.register(Score("magnitude", "matrix", False, False, _each(_magnitude)))
SCORES.register(Score("wanda", "row", True, False, _each(_wanda)))
SCORES.register(Score("sparsegpt", f"block{SPARSEGPT_BLOCK}", True, True, _sparsegpt))
