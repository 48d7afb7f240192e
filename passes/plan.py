"""Plan pass: read the observers, decide a keep-mask (and SparseGPT's new weights) per linear;
mutate no weight.

Unstructured by default. With a pattern (N, M) each target must be N/M (the linear is pruned
N:M) or 0 (it stays dense: its mask keeps everything)."""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx

from tamp_fx.capture.graph import is_linear, weight_name
from tamp_fx.passes.base import DECISION_KEY, PassError, PassResult
from tamp_fx.prune.masks import achieved_sparsity
from tamp_fx.prune.scores import SCORES
from tamp_fx.statistics.observers import LinearObserver


@dataclass(frozen=True)
class LinearDecision:
    """What the plan pass decided for one linear (weight name relative to its layer)."""

    weight: str
    target_sparsity: float
    sparsity: float
    group: str
    mask: torch.Tensor                       # (C_out, C_in) bool, True = keep
    new_weight: torch.Tensor | None = None   # (C_out, C_in) reconstructed weights (SparseGPT), zero where pruned
                                             # (the driver keeps them as KeptValues once the layer is done)
    stats: dict[str, Any] = field(default_factory=dict)
    pattern: str = "unstructured"            # or "N:M", or "dense" (a pattern's target-0 linear)


@dataclass(frozen=True)
class PlanPassConfig:
    score: str
    targets: Mapping[str, float]             # weight name -> target sparsity
    observers: Mapping[str, LinearObserver] = field(default_factory=dict)
    pattern: tuple[int, int] | None = None   # (N, M): targets are N/M (prune N:M) or 0 (leave dense)


def _pattern_of(target: float, pattern: tuple[int, int] | None) -> str | None:
    """How a linear with this target is pruned: "unstructured", "N:M" or "dense"; None if it fits none."""
    if pattern is None:
        return "unstructured"
    if target == 0.0:
        return "dense"
    return f"{pattern[0]}:{pattern[1]}" if math.isclose(target, pattern[0] / pattern[1], abs_tol=1e-12) else None


def _observed(observer: LinearObserver | None) -> dict[str, Any]:
    if observer is None or observer.samples == 0:
        return {}
    stats: dict[str, Any] = {"tokens": observer.stats.n_tokens, "selected_fraction": observer.selected_fraction()}
    if observer.diversity_samples:
        stats["diversity"] = observer.diversity()
        stats["importance"] = observer.importance()
    return stats


def _sharing(names: list[str], observers: Mapping[str, LinearObserver]) -> list[list[str]]:
    """``names`` in groups that share one input statistic (their observers' ``stats`` is one
    object: q/k/v, gate/up), in the order of their first member; a linear without one alone."""
    groups: dict[int, list[str]] = {}
    for name in names:
        observer = observers.get(name)
        groups.setdefault(id(observer.stats) if observer is not None else id(name), []).append(name)
    return list(groups.values())


def plan(gm: torch.fx.GraphModule, config: PlanPassConfig) -> PassResult:
    """Write a LinearDecision into ``node.meta[DECISION_KEY]`` of every targeted linear;
    ``info["decisions"]`` maps weight name -> decision. Linears that share one input statistic
    are decided together (SparseGPT prunes them in one sweep)."""
    score = SCORES[config.score]
    nodes: dict[str, torch.fx.Node] = {}
    kinds: dict[str, str] = {}
    for node in gm.graph.nodes:
        if not is_linear(node):
            continue
        name = weight_name(node)
        if name not in config.targets:
            continue
        observer = config.observers.get(name)
        if score.needs_activations and (observer is None or observer.stats.n_tokens == 0):
            raise PassError("plan", node, f"score {score.name!r} needs activations but the linear's observer saw none")
        kind = _pattern_of(config.targets[name], config.pattern)
        if kind is None:
            n, m = config.pattern
            raise PassError("plan", node, f"target sparsity {config.targets[name]} of {name} is neither {n}/{m} ({n}:{m}) "
                                          "nor 0 (dense)")
        nodes[name], kinds[name] = node, kind
    decided: dict[str, tuple[torch.Tensor, torch.Tensor | None, str]] = {}     # name -> (mask, new weight, group)
    for name in [w for w in nodes if kinds[w] == "dense"]:
        weight = gm.get_parameter(name)                                   # (C_out, C_in)
        decided[name] = torch.ones(weight.shape, dtype=torch.bool, device=weight.device), None, "matrix"
    for names in _sharing([w for w in nodes if kinds[w] != "dense"], config.observers):
        observer = config.observers.get(names[0])
        try:
            pruned = score.decide([gm.get_parameter(w) for w in names], observer.stats if observer else None,
                                  [config.targets[w] for w in names], config.pattern)
        except ValueError as error:
            raise PassError("plan", nodes[names[0]], str(error)) from error
        for w, (mask, new_weight) in zip(names, pruned):
            decided[w] = mask, new_weight, score.group if kinds[w] == "unstructured" else kinds[w]
    decisions: dict[str, LinearDecision] = {}
    for name, node in nodes.items():                                      # in graph order
        mask, new_weight, group = decided[name]
        decision = LinearDecision(name, config.targets[name], achieved_sparsity(mask), group, mask, new_weight,
                                  _observed(config.observers.get(name)), kinds[name])
        node.meta[DECISION_KEY] = decision
        decisions[name] = decision
    return PassResult(gm, modified=False, info={"decisions": decisions})
