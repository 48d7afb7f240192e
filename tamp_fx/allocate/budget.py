"""Turn per-group importances into per-group sparsities under one global parameter budget.

The allocator of DESIGN.md §4 (shared by DAS and ECoFLaP): with P_g parameters in group g
and target s, keep K = floor(sum P_g (1 - s)) parameters in all; each group keeps at least
ceil(P_g (1 - s_max)); the rest is handed out in proportion to importance, groups that fill
are capped and drop out, and the total is met exactly.

:func:`allocate_size_normalised` is a variant beyond the reference: it hands out keep
*fractions* in proportion to importance (``P_g (1 - s) importance_g / mean importance``,
clipped to the same bounds), so two groups of equal importance keep the same share whatever
their sizes.

With an N:M pattern a group cannot take any sparsity, only 0 (dense) or r = N/M:
:func:`choose_nm` picks which groups go N:M.
"""
from __future__ import annotations

import math
from collections.abc import Hashable, Mapping
from typing import TypeVar

K = TypeVar("K", bound=Hashable)


def allocate(sizes: Mapping[str, int], importance: Mapping[str, float], sparsity: float,
             max_sparsity: float) -> dict[str, int]:
    """Parameters to keep per group, summing to ``floor(sum P_g (1 - sparsity))``; the group's
    sparsity is ``1 - keep_g / P_g``.

    >>> allocate({"a": 100, "b": 100}, {"a": 3.0, "b": 1.0}, 0.5, 0.6)  # 40 + 40 kept at least, 20 split 3:1
    {'a': 55, 'b': 45}
    """
    _check(sizes, importance, sparsity, max_sparsity)
    budget = math.floor(sum(sizes.values()) * (1.0 - sparsity) + 1e-9)
    floor_keep = min_keep(sizes, sparsity, max_sparsity)
    keep = {g: float(k) for g, k in floor_keep.items()}
    rest = budget - sum(floor_keep.values())
    open_groups = {g for g in sizes if keep[g] < sizes[g]}
    while rest > 1e-9 and open_groups:                       # water-filling with caps
        total = sum(importance[g] for g in open_groups)
        share = {g: (importance[g] / total if total > 0 else 1.0 / len(open_groups)) for g in open_groups}
        full = {g for g in open_groups if keep[g] + rest * share[g] >= sizes[g]}
        if not full:
            for g in open_groups:
                keep[g] += rest * share[g]
            rest = 0.0
            break
        for g in full:
            rest -= sizes[g] - keep[g]
            keep[g] = float(sizes[g])
        open_groups -= full
    return _round(sizes, keep, importance, budget)


def _check(sizes: Mapping[str, int], importance: Mapping[str, float], sparsity: float, max_sparsity: float) -> None:
    if not 0.0 <= sparsity <= max_sparsity <= 1.0:
        raise ValueError(f"need 0 <= sparsity ({sparsity}) <= max_sparsity ({max_sparsity}) <= 1")
    if any(importance[g] < 0 or not math.isfinite(importance[g]) for g in sizes):
        raise ValueError("importances must be finite and non-negative")


def _round(sizes: Mapping[str, int], keep: Mapping[str, float], importance: Mapping[str, float],
           budget: int) -> dict[str, int]:
    """Whole parameters: the floors, then the remainder to the groups with the largest
    fractional parts (more important first)."""
    whole = {g: math.floor(keep[g] + 1e-9) for g in sizes}
    leftover = budget - sum(whole.values())
    order = sorted((g for g in sizes if whole[g] < sizes[g]), key=lambda g: (-(keep[g] - whole[g]), -importance[g], g))
    for g in order[:max(0, leftover)]:
        whole[g] += 1
    return whole


def allocate_size_normalised(sizes: Mapping[str, int], importance: Mapping[str, float], sparsity: float,
                             max_sparsity: float) -> dict[str, int]:
    """Parameters to keep per group, summing to ``floor(sum P_g (1 - sparsity))`` like
    :func:`allocate`, but with keep fractions proportional to importance.

    Group g keeps ``clip(c P_g importance_g, min_keep_g, P_g)``, with the one scale ``c`` that
    meets the budget; without clipping ``c = (1 - s) / mean importance`` (the mean weighted by
    parameters), so a group of average importance keeps exactly ``1 - s``. Where the groups with
    positive importance cannot absorb the budget (all at P_g), the rest goes to the others in
    proportion to their sizes (an importance below 1e-200 of the largest counts as zero). The
    integer rounding is the reference's.

    >>> allocate_size_normalised({"a": 100, "b": 300}, {"a": 1.0, "b": 1.0}, 0.5, 0.6)  # equal shares
    {'a': 50, 'b': 150}
    >>> allocate_size_normalised({"a": 100, "b": 100}, {"a": 3.0, "b": 1.0}, 0.5, 0.6)  # 75 / 25, b clipped at 40
    {'a': 60, 'b': 40}
    """
    _check(sizes, importance, sparsity, max_sparsity)
    budget = math.floor(sum(sizes.values()) * (1.0 - sparsity) + 1e-9)
    lower = min_keep(sizes, sparsity, max_sparsity)
    top = max((importance[g] for g in sizes), default=0.0)
    relative = {g: importance[g] / top if top > 0 else 0.0 for g in sizes}        # in [0, 1]: no overflow below
    keep = _fill(sizes, lower, {g: sizes[g] * relative[g] if relative[g] > 1e-200 else 0.0 for g in sizes}, budget)
    if sum(keep.values()) < budget - 1e-6:                  # important groups are full: size-weighted rest
        keep = _fill(sizes, keep, {g: float(sizes[g]) if keep[g] < sizes[g] else 0.0 for g in sizes}, budget)
    return _round(sizes, keep, importance, budget)


def _fill(sizes: Mapping[str, int], lower: Mapping[str, float], weight: Mapping[str, float],
          budget: int) -> dict[str, float]:
    """``clip(c weight_g, lower_g, P_g)`` with the least c whose total reaches ``budget``, or
    c = infinity (every weighted group at P_g) when none does. The total is piecewise linear in
    c with breakpoints where a group leaves its lower bound or reaches P_g; solve on the
    segment that crosses the budget."""
    def total(c: float) -> float:
        return sum(min(float(sizes[g]), max(float(lower[g]), c * weight[g])) for g in sizes)

    weighted = [g for g in sizes if weight[g] > 0]
    points = sorted({lower[g] / weight[g] for g in weighted} | {sizes[g] / weight[g] for g in weighted})
    if not points or total(points[-1]) <= budget:
        return {g: float(sizes[g]) if weight[g] > 0 else float(lower[g]) for g in sizes}
    hi = next(p for p in points if total(p) >= budget)
    lo = max([p for p in points if p < hi], default=0.0)
    t_lo, t_hi = total(lo), total(hi)
    c = hi if t_hi <= t_lo else lo + (budget - t_lo) * (hi - lo) / (t_hi - t_lo)   # linear on [lo, hi]
    return {g: min(float(sizes[g]), max(float(lower[g]), c * weight[g])) for g in sizes}


def min_keep(sizes: Mapping[str, int], sparsity: float, max_sparsity: float) -> dict[str, int]:
    """The least each group keeps: ceil(P_g (1 - s_max)), or the floor where the ceilings
    together would exceed the budget (tiny groups with s_max barely above s)."""
    budget = math.floor(sum(sizes.values()) * (1.0 - sparsity) + 1e-9)
    ceil = {g: min(p, math.ceil(p * (1.0 - max_sparsity) - 1e-9)) for g, p in sizes.items()}
    if sum(ceil.values()) <= budget:
        return ceil
    return {g: math.floor(p * (1.0 - max_sparsity) + 1e-9) for g, p in sizes.items()}


def choose_nm(sizes: Mapping[K, int], importance: Mapping[K, float], sparsity: float, ratio: float) -> set[K]:
    """The groups to make N:M (pattern ratio ``ratio`` = N/M); the others stay dense.

    The goal is ``ratio * sum(P of chosen) ~ sparsity * sum(P)`` pruned parameters. Rule: walk
    the groups least important first (equal importances in the order of ``sizes``) and take each
    one while the pruned count stays at or below the goal; at the first group that would
    overshoot, take it only if it overshoots by less than stopping there undershoots, then stop.
    So the chosen groups are never more important than a dense one, and the pruned count misses
    the goal by less than ``ratio * max P_g`` (one group's worth). Needs ``sparsity <= ratio``:
    beyond it even every group made N:M falls short.

    >>> # goal 0.4 * 300 = 120: b (50), c (100), then a would make 150: 30 over > 20 under, stop
    >>> sorted(choose_nm({"a": 100, "b": 100, "c": 100}, {"a": 3.0, "b": 1.0, "c": 2.0}, 0.4, 0.5))
    ['b', 'c']
    """
    if not 0.0 < ratio < 1.0 or not 0.0 <= sparsity <= ratio + 1e-12:
        raise ValueError(f"need 0 <= sparsity ({sparsity}) <= ratio ({ratio}) < 1")
    if any(not math.isfinite(importance[g]) for g in sizes):
        raise ValueError("importances must be finite")
    goal = sparsity * sum(sizes.values())
    pruned, chosen = 0.0, set()
    for g in sorted(sizes, key=lambda g: importance[g]):          # stable: ties keep the order of sizes
        after = pruned + ratio * sizes[g]
        if after > goal + 1e-9:                                     # the first overshoot ends the walk
            if after - goal < goal - pruned:
                chosen.add(g)
            break
        pruned = after
        chosen.add(g)
    return chosen


def owl_sparsities(outlier_ratios: Mapping[str, float], sparsity: float, lam: float) -> dict[str, float]:
    """OWL: map layer outlier ratios D linearly onto [s - lam, s + lam] with mean s; more
    outliers, less sparsity.

    >>> owl_sparsities({"0": 0.1, "1": 0.3}, 0.5, 0.08)
    {'0': 0.58, '1': 0.42}
    """
    values = list(outlier_ratios.values())
    lo, hi = min(values), max(values)
    if hi - lo <= 0:
        return {k: sparsity for k in outlier_ratios}
    scaled = {k: (d - lo) / (hi - lo) * 2 * lam for k, d in outlier_ratios.items()}   # in [0, 2 lam]
    mean = sum(scaled.values()) / len(scaled)
    return {k: round(1.0 - (v - mean + 1.0 - sparsity), 12) for k, v in scaled.items()}
