"""Compare two plans of the same model: each linear's sparsity in both, and how much of what
they keep is the same (Jaccard index of the keep-masks)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from tamp_fx.artifact.plan import Plan
from tamp_fx.artifact.report import projection_names
from tamp_fx.errors import TampError


@dataclass(frozen=True)
class LinearDiff:
    layer: int
    projection: str
    sparsity_a: float
    sparsity_b: float
    jaccard: float            # |keep_a & keep_b| / |keep_a | keep_b| (1.0 when both keep nothing)
    kept_both: int
    kept_either: int


@dataclass(frozen=True)
class PlanDiff:
    linears: dict[str, LinearDiff]   # checkpoint weight name -> comparison, in plan A's order
    sparsity_a: float
    sparsity_b: float
    jaccard: float                   # over every weight of every linear

    def to_json(self) -> dict:
        return {"sparsity_a": self.sparsity_a, "sparsity_b": self.sparsity_b, "jaccard": self.jaccard,
                "linears": {n: vars(d) for n, d in self.linears.items()}}


def jaccard(a: torch.Tensor, b: torch.Tensor) -> tuple[float, int, int]:
    """Jaccard index of two boolean masks, with the sizes of their intersection and union.

    >>> jaccard(torch.tensor([True, True, False]), torch.tensor([True, False, False]))
    (0.5, 1, 2)
    """
    both, either = int((a & b).sum()), int((a | b).sum())
    return (both / either if either else 1.0), both, either


def same_model(a: Plan, b: Plan) -> bool:
    """Whether plans ``a`` and ``b`` were made for one model (the same model fingerprint)."""
    return a.model.get("fingerprint") == b.model.get("fingerprint")


def describe_models(a: Plan, b: Plan) -> str:
    """Both plans and the model each was made for, for a message about them."""
    return " and ".join(f"{p.path or label} (made for {p.model.get('source')}, "
                        f"fingerprint {p.model.get('fingerprint')})" for p, label in ((a, "plan A"), (b, "plan B")))


def diff_plans(a: Plan, b: Plan, *, force: bool = False) -> PlanDiff:
    """Compare plans ``a`` and ``b`` of one model; refuse, in one line naming both, plans of
    different models. ``force``: compare plans of different models all the same, if their
    linears have the same names and shapes (the caller says so)."""
    if not same_model(a, b) and not force:
        raise TampError(f"the plans are of different models: {describe_models(a, b)}: diff compares plans of one "
                        "model (--force compares them anyway)")
    if a.linears.keys() != b.linears.keys():
        only = sorted(a.linears.keys() ^ b.linears.keys())
        raise TampError(f"the plans prune different linears ({len(only)} in one only, such as {only[0]}): "
                        f"{describe_models(a, b)} cannot be compared, even with --force")
    for name, lp in a.linears.items():
        if b.linears[name].shape != lp.shape:
            raise TampError(f"the plans give {name} different shapes ({lp.shape} and {b.linears[name].shape}): "
                            f"{describe_models(a, b)} cannot be compared, even with --force")
    projections = projection_names({"linears": {n: {"layer": lp.layer} for n, lp in a.linears.items()}})
    rows, both, either, size = {}, 0, 0, 0
    pruned_a = pruned_b = 0.0
    for name, lp in a.linears.items():
        score, n_both, n_either = jaccard(a.masks[name], b.masks[name])
        rows[name] = LinearDiff(lp.layer, projections[name], lp.sparsity, b.linears[name].sparsity,
                                score, n_both, n_either)
        n = lp.shape[0] * lp.shape[1]
        both, either, size = both + n_both, either + n_either, size + n
        pruned_a += n * lp.sparsity
        pruned_b += n * b.linears[name].sparsity
    return PlanDiff(rows, pruned_a / size if size else 0.0, pruned_b / size if size else 0.0,
                    both / either if either else 1.0)
