"""Allocation strategies, registered by name: from dense statistics to a target sparsity per linear.

Each returns, per (layer, weight name), the target sparsity and the statistics behind it
(recorded in plan.json).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tamp_fx.allocation import allocate, owl_sparsities
from tamp_fx.config import PlanConfig
from tamp_fx.driver import LayerProfile

Key = tuple[int, str]  # (layer index, weight name relative to the layer)


@dataclass(frozen=True)
class Allocation:
    targets: dict[Key, float]
    stats: dict[Key, dict[str, Any]] = field(default_factory=dict)


def _by_groups(profiles: list[LayerProfile], group_of: Callable[[int, str], str], importance: dict[str, float],
               config: PlanConfig) -> Allocation:
    sizes: dict[str, int] = {}
    members: dict[str, list[Key]] = {}
    for p in profiles:
        for w, size in p.sizes.items():
            g = group_of(p.index, w)
            sizes[g] = sizes.get(g, 0) + size
            members.setdefault(g, []).append((p.index, w))
    keep = allocate(sizes, importance, config.sparsity, config.max_sparsity)
    targets, stats = {}, {}
    for g, keys in members.items():
        for key in keys:
            targets[key] = 1.0 - keep[g] / sizes[g]
            stats[key] = {"group": g, "group_importance": importance[g], "group_parameters": sizes[g], "group_keep": keep[g]}
    return Allocation(targets, stats)


def _uniform(profiles, config, extra):
    return Allocation({(p.index, w): config.sparsity for p in profiles for w in p.sizes})


def _das(profiles, config, extra):
    importance = {f"{p.index}:{w}": p.importance[w] for p in profiles for w in p.sizes}
    result = _by_groups(profiles, lambda i, w: f"{i}:{w}", importance, config)
    for p in profiles:
        for w in p.sizes:
            result.stats[(p.index, w)].update({"importance": p.importance[w], "diversity": p.diversity[w]})
    return result


def _block_importance(profiles: list[LayerProfile]) -> dict[str, float]:
    groups: dict[str, list[float]] = {}
    for p in profiles:
        for w, info in p.linears.items():
            groups.setdefault(f"{p.index}:{info.block}", []).append(p.importance[w])
    return {g: sum(v) / len(v) for g, v in groups.items()}


def _das_block(profiles, config, extra):
    blocks = {(p.index, w): f"{p.index}:{p.linears[w].block}" for p in profiles for w in p.sizes}
    result = _by_groups(profiles, lambda i, w: blocks[(i, w)], _block_importance(profiles), config)
    for p in profiles:
        for w in p.sizes:
            result.stats[(p.index, w)].update({"importance": p.importance[w], "diversity": p.diversity[w]})
    return result


def _owl(profiles, config, extra):
    per_layer = owl_sparsities({str(p.index): p.outlier_ratio for p in profiles}, config.sparsity, config.owl_lambda)
    targets = {(p.index, w): per_layer[str(p.index)] for p in profiles for w in p.sizes}
    stats = {(p.index, w): {"layer_outlier_ratio": p.outlier_ratio, "layer_sparsity": per_layer[str(p.index)]}
             for p in profiles for w in p.sizes}
    return Allocation(targets, stats)


def _ecoflap(profiles, config, extra):
    importance = extra["block_importance"]
    return _by_groups(profiles, lambda i, w: f"{i}:{profiles[i].linears[w].block}", importance, config)


#: name -> (needs a dense profile, needs ECoFLaP's zeroth-order pass, strategy)
ALLOCATORS: dict[str, tuple[bool, bool, Callable[[list[LayerProfile], PlanConfig, dict], Allocation]]] = {
    "uniform": (False, False, _uniform),
    "das": (True, False, _das),
    "das-alltoken": (True, False, _das),
    "das-block": (True, False, _das_block),
    "owl": (True, False, _owl),
    "ecoflap": (False, True, _ecoflap),
}
