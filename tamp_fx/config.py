"""Frozen, validated configs that round-trip through JSON (the plan records the one it was made with).

A method is (allocation, score, tokens); the names users type are shortcuts for combinations.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import re
from dataclasses import dataclass
from typing import Any

from tamp_fx.allocate.strategies import ALLOCATORS
from tamp_fx.errors import TampError
from tamp_fx.prune.scores import SCORES
from tamp_fx.statistics.tokens import TOKEN_SELECTIONS

log = logging.getLogger(__name__)

#: The names each part of a method takes, as their registries hold them.
ALLOCATIONS, SCORE_NAMES, TOKEN_NAMES = ALLOCATORS.names(), SCORES.names(), TOKEN_SELECTIONS.names()

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
    "tamp-sparsegpt": ("das", "sparsegpt", "amia"),   # beyond the paper: AMIA tokens for SparseGPT's Hessian
    # beyond the paper, named after benchmark v2's screen (docs/results.md, "Methods that use the modalities")
    "das-sparsegpt-atv": ("das", "sparsegpt", "atv"),  # DAS allocation, SparseGPT over text + the most-changed images
    "sparsegpt-atv": ("uniform", "sparsegpt", "atv"),
    "das-sparsegpt": ("das", "sparsegpt", "all"),      # the paper's Table 4b: DAS allocation for SparseGPT
    "wanda-atv": ("uniform", "wanda", "atv"),
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

    ``sequential`` says what a linear's statistics see. Layers are always planned in order, each on
    the outputs of the pruned layers before it. With ``"layers"`` every linear of a layer is
    calibrated on the dense layer, then the layer's outputs are computed again with the pruned
    weights (two passes per layer). With ``"groups"`` the linears that read one tensor (q/k/v,
    gate/up) are planned together on the outputs of the already-pruned groups before them in the
    layer, in one pass (SparseGPT's "true sequential" order). Only token selection ``"all"`` can
    (the others choose or weigh tokens per linear, amia and attention from the dense layer's
    outputs and attention, atv from its change), so it is the default there, ``"layers"`` elsewhere.

    ``pattern`` ("N:M", e.g. "2:4") asks for N:M sparsity: N zeros in every M consecutive input
    columns of each row. With ``allocation="uniform"`` every linear is N:M and ``sparsity`` is
    N/M whatever was passed (a different value is replaced, with a warning). With any other
    allocation each linear is either dense or N:M, the least important made N:M until
    ``sparsity`` is met overall, so ``sparsity`` may not exceed N/M. Left as None, ``sparsity``
    is 0.5, or with a pattern min(0.5, N/M) (N/M under uniform allocation).

    >>> PlanConfig(method="tamp").allocation, PlanConfig(method="tamp").tokens
    ('das', 'amia')
    >>> PlanConfig(method="wanda", allocation="owl").method
    'owl'
    >>> PlanConfig.from_dict(PlanConfig(sparsity=0.3).to_dict()) == PlanConfig(sparsity=0.3)
    True
    >>> PlanConfig(method="wanda", pattern="1:4").sparsity, PlanConfig(method="das", pattern="2:4", sparsity=0.4).nm
    (0.25, (2, 4))
    """

    method: str = "wanda"
    sparsity: float | None = None        # None: 0.5, or what the pattern allows (see above)
    pattern: str | None = None           # "N:M" sparsity, e.g. "2:4"; None: unstructured
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
    atv_alpha: float = 1.0               # tokens = atv: image tokens kept per text token, times the layer's mean change
    sequential: str | None = None        # "groups" or "layers"; None: groups where the token selection allows (see above)

    def __post_init__(self) -> None:
        if self.method != CUSTOM and self.method not in METHODS:
            raise TampError(f"unknown method {self.method!r}: choose one of {', '.join(METHODS)}")
        if self.method == CUSTOM and None in (self.allocation, self.score, self.tokens):
            raise TampError("method 'custom' needs --allocation, --score and --tokens")
        defaults = METHODS.get(self.method, (None, None, None))
        parts = tuple(given if given is not None else default
                      for given, default in zip((self.allocation, self.score, self.tokens), defaults))
        for value, registry in zip(parts, (ALLOCATORS, SCORES, TOKEN_SELECTIONS)):
            registry[value]                              # one line naming the choices if unknown
        object.__setattr__(self, "allocation", parts[0])
        object.__setattr__(self, "score", parts[1])
        object.__setattr__(self, "tokens", parts[2])
        object.__setattr__(self, "method", method_name(*parts))
        if self.sparsity is not None and not 0.0 <= self.sparsity < 1.0:
            raise TampError(f"sparsity {self.sparsity} is outside [0, 1): pass a fraction such as 0.5")
        self._resolve_pattern()
        self._resolve_sequential()
        if not 0.0 <= self.max_sparsity_delta <= 1.0:
            raise TampError(f"max_sparsity_delta {self.max_sparsity_delta} is outside [0, 1]")
        if self.nsamples < 1:
            raise TampError(f"nsamples must be at least 1, got {self.nsamples}")
        if self.seqlen < 2:
            raise TampError(f"seqlen must be at least 2 tokens, got {self.seqlen}")
        if self.random_tokens < 1:
            raise TampError(f"random_tokens must be at least 1, got {self.random_tokens}")
        if not (self.atv_alpha > 0 and math.isfinite(self.atv_alpha)):
            raise TampError(f"atv_alpha must be a positive number, got {self.atv_alpha}")
        if self.atv_alpha != 1.0 and self.tokens != "atv":
            raise TampError(f"atv_alpha applies to tokens 'atv', not {self.tokens!r}: add --tokens atv or drop --atv-alpha")
        if self.owl_m <= 0 or self.owl_lambda < 0 or self.ecoflap_epsilon <= 0:
            raise TampError("owl_m and ecoflap_epsilon must be positive and owl_lambda non-negative")

    def _resolve_sequential(self) -> None:
        per_group = TOKEN_SELECTIONS[self.tokens].selector(self) is None    # every token counts the same
        if self.sequential is None:
            object.__setattr__(self, "sequential", "groups" if per_group else "layers")
        elif self.sequential not in ("groups", "layers"):
            raise TampError(f"sequential {self.sequential!r} is neither 'groups' nor 'layers'")
        elif self.sequential == "groups" and not per_group:
            raise TampError(f"token selection {self.tokens!r} plans a layer at a time (only 'all' plans by groups): "
                            "use --sequential layers")

    def _resolve_pattern(self) -> None:
        """Validate and normalise ``pattern``; settle ``sparsity`` (its default, and N/M under uniform)."""
        if self.pattern is None:
            if self.sparsity is None:
                object.__setattr__(self, "sparsity", 0.5)
            return
        match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(self.pattern))
        if match is None:
            raise TampError(f"pattern {self.pattern!r} is not N:M: pass two integers such as 2:4")
        n, m = int(match[1]), int(match[2])
        if not 0 < n < m:
            raise TampError(f"pattern {self.pattern!r} needs 0 < N < M: pass one such as 2:4 or 4:8")
        object.__setattr__(self, "pattern", f"{n}:{m}")
        ratio = n / m
        if self.sparsity is None:
            object.__setattr__(self, "sparsity", ratio if self.allocation == "uniform" else min(0.5, ratio))
        elif self.allocation == "uniform" and not math.isclose(self.sparsity, ratio, abs_tol=1e-12):
            log.warning("pattern %s with uniform allocation prunes %s of every linear: sparsity %s is ignored",
                        self.pattern, ratio, self.sparsity)
            object.__setattr__(self, "sparsity", ratio)
        elif self.sparsity > ratio + 1e-12:
            raise TampError(f"sparsity {self.sparsity} is out of reach of pattern {self.pattern}: with {self.allocation} "
                            f"allocation each linear is dense or {self.pattern}, so at most {ratio:g} overall")

    @property
    def nm(self) -> tuple[int, int] | None:
        """``pattern`` as (N, M), or None when unstructured."""
        if self.pattern is None:
            return None
        n, m = self.pattern.split(":")
        return int(n), int(m)

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
        return cls(**{"sequential": "layers", **data})     # plans written before "groups" existed were planned by layers
