"""SparseGPT's Hessian H = 2 X^T X of a linear's inputs, summed over calibration tokens."""
from __future__ import annotations

import math

import torch


class HessianAccumulator:
    """Streaming ``H = 2/n X^T X`` (C_in, C_in) float32 over every calibration token seen.

    Kept in the reference's running-average form (``H *= n/(n+t); H += 2/(n+t) x^T x``), so
    its scale does not grow with the number of tokens. Lives on the device of the first input.

    >>> acc = HessianAccumulator()
    >>> acc.add(torch.tensor([[1.0, 0.0], [1.0, 2.0]]))
    >>> acc.n_tokens, acc.hessian.tolist()
    (2, [[2.0, 2.0], [2.0, 4.0]])
    """

    def __init__(self) -> None:
        self._h: torch.Tensor | None = None  # (C_in, C_in) float32
        self.n_tokens: float = 0             # tokens seen, each counted with its weight

    @torch.no_grad()
    def add(self, x: torch.Tensor, weight: float | None = None) -> None:
        """Accumulate the inputs ``x`` (..., C_in) of the layer: every leading index is a token.
        Weighted tokens come in scaled by sqrt(their weight), with ``weight`` their total."""
        if x.dim() < 1:
            raise ValueError("x must have at least one dimension (..., C_in)")
        c_in = x.shape[-1]
        if self._h is None:
            self._h = torch.zeros(c_in, c_in, dtype=torch.float32, device=x.device)  # (C_in, C_in)
        elif self._h.shape[0] != c_in:
            raise ValueError(f"x has {c_in} input columns but the accumulator holds {self._h.shape[0]}")
        x2 = x.detach().reshape(-1, c_in).to(device=self._h.device, dtype=torch.float32)  # (t, C_in)
        t = x2.shape[0] if weight is None else weight
        if t == 0:
            return
        n = self.n_tokens + t
        self._h.mul_(self.n_tokens / n)
        x2 = x2 * math.sqrt(2.0 / n)  # (t, C_in)
        self._h.addmm_(x2.T, x2)  # (C_in, C_in)
        self.n_tokens = n

    def merge(self, hessian: torch.Tensor, n_tokens: float) -> None:
        """Replace the running Hessian by one over ``n_tokens`` tokens (the ranks' Hessians combined)."""
        self._h, self.n_tokens = hessian, n_tokens

    @property
    def hessian(self) -> torch.Tensor:
        """``2/n X^T X`` (C_in, C_in) float32. The live buffer, not a copy: do not modify it."""
        if self._h is None or self.n_tokens == 0:
            raise ValueError("the Hessian accumulator saw no calibration tokens; run calibration data through the layer first")
        return self._h
