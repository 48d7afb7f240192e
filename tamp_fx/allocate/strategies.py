"""Allocation strategies, registered by name: from dense statistics to a target sparsity per linear.

Each returns, per (layer, weight name), the target sparsity and the statistics behind it
(recorded in plan.json). With an N:M pattern every strategy ranks the linears by its own
importance instead (DAS: the linear's; DAS-block and ECoFLaP: its block's; OWL: its layer's
outlier ratio) and :func:`~tamp_fx.allocate.budget.choose_nm` makes the least important N:M
(target N/M) and leaves the others dense (target 0).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tamp_fx.allocate.budget import allocate, allocate_size_normalised, choose_nm, owl_sparsities
from tamp_fx.registry import Registry

if TYPE_CHECKING:
    from tamp_fx.capture.graph import LinearInfo
    from tamp_fx.config import PlanConfig

Key = tuple[int, str]  # (layer index, weight name relative to the layer)


@dataclass
class LayerProfile:
    """Dense statistics of one decoder layer: what an allocation strategy reads."""

    index: int
    linears: dict[str, LinearInfo]
    sizes: dict[str, int]                                       # weight name -> parameters
    importance: dict[str, float] = field(default_factory=dict)  # DAS: mean diversity per linear
    diversity: dict[str, dict[str, float]] = field(default_factory=dict)
    outlier_ratio: float | None = None                          # OWL


@dataclass(frozen=True)
class Allocation:
    targets: dict[Key, float]
    stats: dict[Key, dict[str, Any]] = field(default_factory=dict)


def _nm(profiles: list[LayerProfile], importance: dict[Key, float], config: PlanConfig) -> Allocation:
    """N:M (target N/M) for the least important linears, dense (0.0) for the rest, meeting
    ``config.sparsity`` overall within one linear's worth of parameters."""
    n, m = config.nm
    sizes = {(p.index, w): size for p in profiles for w, size in p.sizes.items()}
    chosen = choose_nm(sizes, importance, config.sparsity, n / m)
    return Allocation({key: n / m if key in chosen else 0.0 for key in sizes},
                      {key: {"nm_importance": importance[key]} for key in sizes})


def _by_groups(profiles: list[LayerProfile], group_of: Callable[[int, str], str], importance: dict[str, float],
               config: PlanConfig, allocator: Callable[..., dict[str, int]] = allocate) -> Allocation:
    if config.nm:
        result = _nm(profiles, {(p.index, w): importance[group_of(p.index, w)] for p in profiles for w in p.sizes}, config)
        for (i, w), stats in result.stats.items():
            stats.update({"group": group_of(i, w), "group_importance": importance[group_of(i, w)]})
        return result
    sizes: dict[str, int] = {}
    members: dict[str, list[Key]] = {}
    for p in profiles:
        for w, size in p.sizes.items():
            g = group_of(p.index, w)
            sizes[g] = sizes.get(g, 0) + size
            members.setdefault(g, []).append((p.index, w))
    keep = allocator(sizes, importance, config.sparsity, config.max_sparsity)
    targets, stats = {}, {}
    for g, keys in members.items():
        for key in keys:
            targets[key] = 1.0 - keep[g] / sizes[g]
            stats[key] = {"group": g, "group_importance": importance[g], "group_parameters": sizes[g], "group_keep": keep[g]}
    return Allocation(targets, stats)


def _with_diversity(result: Allocation, profiles: list[LayerProfile]) -> Allocation:
    """Record each linear's own importance and diversity terms beside its allocation."""
    for p in profiles:
        for w in p.sizes:
            result.stats[(p.index, w)].update({"importance": p.importance[w], "diversity": p.diversity[w]})
    return result


def _das(profiles, config, extra, allocator=allocate):
    importance = {f"{p.index}:{w}": p.importance[w] for p in profiles for w in p.sizes}
    return _with_diversity(_by_groups(profiles, lambda i, w: f"{i}:{w}", importance, config, allocator), profiles)


def _das_size(profiles, config, extra):
    """DAS importances, keep fractions in proportion to them (:func:`allocate_size_normalised`)."""
    return _das(profiles, config, extra, allocate_size_normalised)


def _block_importance(profiles: list[LayerProfile]) -> dict[str, float]:
    groups: dict[str, list[float]] = {}
    for p in profiles:
        for w, info in p.linears.items():
            groups.setdefault(f"{p.index}:{info.block}", []).append(p.importance[w])
    return {g: sum(v) / len(v) for g, v in groups.items()}


def _das_block(profiles, config, extra):
    blocks = {(p.index, w): f"{p.index}:{p.linears[w].block}" for p in profiles for w in p.sizes}
    return _with_diversity(_by_groups(profiles, lambda i, w: blocks[(i, w)], _block_importance(profiles), config),
                           profiles)


def _owl(profiles, config, extra):
    if config.nm:                                       # more outliers, more important
        result = _nm(profiles, {(p.index, w): p.outlier_ratio for p in profiles for w in p.sizes}, config)
        for stats in result.stats.values():
            stats["layer_outlier_ratio"] = stats["nm_importance"]
        return result
    per_layer = owl_sparsities({str(p.index): p.outlier_ratio for p in profiles}, config.sparsity, config.owl_lambda)
    targets = {(p.index, w): per_layer[str(p.index)] for p in profiles for w in p.sizes}
    stats = {(p.index, w): {"layer_outlier_ratio": p.outlier_ratio, "layer_sparsity": per_layer[str(p.index)]}
             for p in profiles for w in p.sizes}
    return Allocation(targets, stats)


def _ecoflap(profiles, config, extra):
    importance = extra["block_importance"]
    return _by_groups(profiles, lambda i, w: f"{i}:{profiles[i].linears[w].block}", importance, config)


@dataclass(frozen=True)
class Allocator:
    """An allocation strategy: what it needs computed first, and how it decides. ``strategy`` None
    (uniform): every linear gets the config's sparsity."""

    name: str
    needs_profile: bool                  # a dense pass over every layer (diversities, outlier ratios)
    needs_zeroth_order: bool             # ECoFLaP's zeroth-order pass over the whole model
    strategy: Callable[[list[LayerProfile], PlanConfig, dict], Allocation] | None


ALLOCATORS: Registry[Allocator] = Registry("allocation")
ALLOCATORS.register(Allocator("uniform", False, False, None))
ALLOCATORS.register(Allocator("das", True, False, _das))
ALLOCATORS.register(Allocator("das-block", True, False, _das_block))
ALLOCATORS.register(Allocator("das-alltoken", True, False, _das))
ALLOCATORS.register(Allocator("das-size", True, False, _das_size))
ALLOCATORS.register(Allocator("owl", True, False, _owl))
ALLOCATORS.register(Allocator("ecoflap", False, True, _ecoflap))
