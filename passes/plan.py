"""Plan pass: read the observers, decide a keep-mask per linear; mutate no weight."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx

from tamp_fx.passes.base import DECISION_KEY, PassError, PassResult
from tamp_fx.graph import is_linear, weight_name
from tamp_fx.masks import achieved_sparsity, keep_mask
from tamp_fx.observers import LinearObserver
from tamp_fx.scores import SCORES


@dataclass(frozen=True)
class LinearDecision:
    """What the plan pass decided for one linear (weight name relative to its layer)."""

    weight: str
    target_sparsity: float
    sparsity: float
    group: str
    mask: torch.Tensor                       # (C_out, C_in) bool, True = keep
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PlanPassConfig:
    score: str
    targets: Mapping[str, float]             # weight name -> target sparsity
    observers: Mapping[str, LinearObserver] = field(default_factory=dict)


def plan(gm: torch.fx.GraphModule, config: PlanPassConfig) -> PassResult:
    """Write a LinearDecision into ``node.meta[DECISION_KEY]`` of every targeted linear;
    ``info["decisions"]`` maps weight name -> decision."""
    score = SCORES[config.score]
    decisions: dict[str, LinearDecision] = {}
    for node in gm.graph.nodes:
        if not is_linear(node):
            continue
        name = weight_name(node)
        if name not in config.targets:
            continue
        observer = config.observers.get(name)
        if score.needs_activations and (observer is None or observer.n_tokens == 0):
            raise PassError("plan", node, f"score {score.name!r} needs activations but the linear's observer saw none")
        weight = gm.get_parameter(name)                                   # (C_out, C_in)
        target = config.targets[name]
        mask = keep_mask(score.fn(weight, observer), target, score.group)
        stats: dict[str, Any] = {}
        if observer is not None and observer.n_tokens:
            stats["tokens"] = observer.n_tokens
        decision = LinearDecision(name, target, achieved_sparsity(mask), score.group, mask, stats)
        node.meta[DECISION_KEY] = decision
        decisions[name] = decision
    return PassResult(gm, modified=False, info={"decisions": decisions})
