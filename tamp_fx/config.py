"""Frozen, validated configs that round-trip through JSON (the plan records the one it was made with)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from tamp_fx.errors import TampError

#: Shortcut method name -> (allocation, score, tokens). Parts are listed in tamp_fx.methods.
METHODS: dict[str, tuple[str, str, str]] = {
    "magnitude": ("uniform", "magnitude", "all"),
    "wanda": ("uniform", "wanda", "all"),
}


@dataclass(frozen=True)
class PlanConfig:
    """How to plan: which method, how sparse, and on how much calibration data.

    >>> PlanConfig(method="wanda", sparsity=0.5).score
    'wanda'
    >>> PlanConfig.from_dict(PlanConfig(sparsity=0.3).to_dict()) == PlanConfig(sparsity=0.3)
    True
    """

    method: str = "wanda"
    sparsity: float = 0.5
    nsamples: int = 128
    seqlen: int = 512
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise TampError(f"unknown method {self.method!r}: choose one of {', '.join(METHODS)}")
        if not 0.0 <= self.sparsity < 1.0:
            raise TampError(f"sparsity {self.sparsity} is outside [0, 1): pass a fraction such as 0.5")
        if self.nsamples < 1:
            raise TampError(f"nsamples must be at least 1, got {self.nsamples}")
        if self.seqlen < 2:
            raise TampError(f"seqlen must be at least 2 tokens, got {self.seqlen}")

    @property
    def allocation(self) -> str:
        return METHODS[self.method][0]

    @property
    def score(self) -> str:
        return METHODS[self.method][1]

    @property
    def tokens(self) -> str:
        return METHODS[self.method][2]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PlanConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise TampError(f"plan config has unknown keys {sorted(unknown)}: was it written by a newer tamp-fx?")
        return cls(**data)
