"""Frozen, validated configs that round-trip through JSON (the plan records the one it was made with).

A method is (allocation, score, tokens); the names users type are shortcuts for combinations.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from tamp_fx.errors import TampError

ALLOCATIONS = ("uniform", "das", "das-block", "das-alltoken", "owl", "ecoflap")
SCORE_NAMES = ("magnitude", "wanda", "sparsegpt")
TOKEN_NAMES = ("all", "amia", "attention", "random")

#: Shortcut method name -> (allocation, score, tokens).
METHODS: dict[str, tuple[str, str, str]] = {
    "magnitude": ("uniform", "magnitude", "all"),
    "wanda": ("uniform", "wanda", "all"),
    "sparsegpt": ("uniform", "sparsegpt", "all"),
    "owl": ("owl", "wanda", "all"),
    "ecoflap": ("ecoflap", "wanda", "all"),
    "das": ("das", "wanda", "all"),
    "amia": ("uniform", "wanda", "amia"),
    "tamp": ("das", "wanda", "amia"),
}
CUSTOM = "custom"


def method_name(allocation: str, score: str, tokens: str) -> str:
    """The shortcut for a combination, or ``"custom"``."""
    return next((m for m, parts in METHODS.items() if parts == (allocation, score, tokens)), CUSTOM)


@dataclass(frozen=True)
class PlanConfig:
    """How to plan: which method, how sparse, and on how much calibration data.

    Parts left as None come from the ``method`` shortcut; giving a part that differs from the
    shortcut makes the method ``"custom"``.

    >>> PlanConfig(method="tamp").allocation, PlanConfig(method="tamp").tokens
    ('das', 'amia')
    >>> PlanConfig(method="wanda", allocation="owl").method
    'owl'
    >>> PlanConfig.from_dict(PlanConfig(sparsity=0.3).to_dict()) == PlanConfig(sparsity=0.3)
    True
    """

    method: str = "wanda"
    sparsity: float = 0.5
    allocation: str | None = None
    score: str | None = None
    tokens: str | None = None
    nsamples: int = 128
    seqlen: int = 512
    seed: int = 0
    max_sparsity_delta: float = 0.1      # DAS / ECoFLaP: no group sparser than sparsity + this
    owl_m: float = 5.0                   # OWL: outliers are scores above M x their layer's mean
    owl_lambda: float = 0.08             # OWL: layer sparsities span [s - lambda, s + lambda]
    ecoflap_epsilon: float = 1e-3        # ECoFLaP: zeroth-order perturbation size
    random_tokens: int = 100             # tokens = random: how many tokens per sample

    def __post_init__(self) -> None:
        if self.method != CUSTOM and self.method not in METHODS:
            raise TampError(f"unknown method {self.method!r}: choose one of {', '.join(METHODS)}")
        if self.method == CUSTOM and None in (self.allocation, self.score, self.tokens):
            raise TampError("method 'custom' needs --allocation, --score and --tokens")
        defaults = METHODS.get(self.method, (None, None, None))
        parts = tuple(given if given is not None else default
                      for given, default in zip((self.allocation, self.score, self.tokens), defaults))
        for value, valid, what in zip(parts, (ALLOCATIONS, SCORE_NAMES, TOKEN_NAMES), ("allocation", "score", "tokens")):
            if value not in valid:
                raise TampError(f"unknown {what} {value!r}: choose one of {', '.join(valid)}")
        object.__setattr__(self, "allocation", parts[0])
        object.__setattr__(self, "score", parts[1])
        object.__setattr__(self, "tokens", parts[2])
        object.__setattr__(self, "method", method_name(*parts))
        if not 0.0 <= self.sparsity < 1.0:
            raise TampError(f"sparsity {self.sparsity} is outside [0, 1): pass a fraction such as 0.5")
        if not 0.0 <= self.max_sparsity_delta <= 1.0:
            raise TampError(f"max_sparsity_delta {self.max_sparsity_delta} is outside [0, 1]")
        if self.nsamples < 1:
            raise TampError(f"nsamples must be at least 1, got {self.nsamples}")
        if self.seqlen < 2:
            raise TampError(f"seqlen must be at least 2 tokens, got {self.seqlen}")
        if self.random_tokens < 1:
            raise TampError(f"random_tokens must be at least 1, got {self.random_tokens}")
        if self.owl_m <= 0 or self.owl_lambda < 0 or self.ecoflap_epsilon <= 0:
            raise TampError("owl_m and ecoflap_epsilon must be positive and owl_lambda non-negative")

    @property
    def max_sparsity(self) -> float:
        return min(1.0, self.sparsity + self.max_sparsity_delta)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PlanConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise TampError(f"plan config has unknown keys {sorted(unknown)}: was it written by a newer tamp-fx?")
        return cls(**data)
