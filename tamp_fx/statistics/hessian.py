"""SparseGPT's Hessian H = 2 X^T X of a linear's inputs, summed over calibration tokens."""
from __future__ import annotations

import torch

from tamp_fx.statistics.products import exact_bf16_products, gram_blocks, mirror_upper_, upper_gram_

#: inputs wait to be multiplied until they fill this many rows or :data:`FLUSH_ELEMENTS` values:
#: one large ``x^T x`` is faster than many small ones (1.5x for 512 x 1536 -> 4096 x 1536 on a CPU)
FLUSH_ROWS, FLUSH_ELEMENTS = 4096, 2**24


class HessianAccumulator:
    """Streaming ``H = 2/n X^T X`` (C_in, C_in) float32 over every calibration token seen.

    Kept in the reference's running-average form (``H *= n/(n+t); H += 2/(n+t) x^T x``), so
    its scale does not grow with the number of tokens; inputs are gathered into products of
    :data:`FLUSH_ROWS` rows (float32 accumulation throughout), of the upper blocks only
    (:func:`~tamp_fx.statistics.products.upper_gram_`): the Hessian read is exactly symmetric.
    bfloat16 inputs wait and multiply as they are where that product is exact
    (:func:`~tamp_fx.statistics.products.exact_bf16_products`), others as float32.
    Lives on the device of the first input.

    >>> acc = HessianAccumulator()
    >>> acc.add(torch.tensor([[1.0, 0.0], [1.0, 2.0]]))
    >>> acc.n_tokens, acc.hessian.tolist()
    (2, [[2.0, 2.0], [2.0, 4.0]])
    """

    def __init__(self) -> None:
        self._h: torch.Tensor | None = None  # (C_in, C_in) float32
        self._n: float = 0                   # tokens in _h
        self._buffer: torch.Tensor | None = None  # (capacity, C_in): inputs not yet in _h, rows [0, _waiting_rows)
        self._waiting_rows = 0
        self._waiting_n: float = 0           # their tokens, each counted with its weight
        self._mirrored = True                # the blocks below the diagonal are up to date
        self._blocks = 1                     # the block rows of the products since they were

    @property
    def n_tokens(self) -> float:
        """Tokens seen, each counted with its weight."""
        return self._n + self._waiting_n

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
        x2 = x.detach().reshape(-1, c_in)                                    # (t, C_in)
        t = x2.shape[0] if weight is None else weight
        if t == 0:
            return
        rows, capacity = x2.shape[0], max(1, min(FLUSH_ROWS, FLUSH_ELEMENTS // c_in))
        exact = x2.dtype == torch.bfloat16 and exact_bf16_products(self._h.device)
        dtype = torch.bfloat16 if exact else torch.float32      # what the inputs wait and multiply in
        if self._waiting_rows + rows > capacity or (self._buffer is not None and self._buffer.dtype != dtype):
            self._flush()
        if rows >= capacity:                 # too many to wait for company: multiplied as they come
            self._multiply(x2.to(device=self._h.device, dtype=dtype), t)
            return
        if self._buffer is None or self._buffer.dtype != dtype:   # one buffer, filled in place: no list of copies
            self._buffer = torch.empty(capacity, c_in, dtype=dtype, device=self._h.device)
        self._buffer[self._waiting_rows:self._waiting_rows + rows].copy_(x2)
        self._waiting_rows += rows
        self._waiting_n += t
        if self._waiting_rows == capacity:
            self._flush()

    def _flush(self) -> None:
        if self._waiting_rows:
            self._multiply(self._buffer[:self._waiting_rows], self._waiting_n)
            self._waiting_rows, self._waiting_n = 0, 0

    def _multiply(self, x: torch.Tensor, t: float) -> None:
        """Add ``x`` (T, C_in) (bfloat16 or float32), ``t`` tokens, to the running Hessian."""
        n = self._n + t
        blocks = gram_blocks(self._h.device, x.dtype, x.shape[1])
        if not self._mirrored and blocks != self._blocks:
            mirror_upper_(self._h, self._blocks)           # the other block layout: its lower blocks from its upper ones
        upper_gram_(self._h, x, blocks, alpha=2.0 / n, beta=self._n / n)
        self._n, self._blocks, self._mirrored = n, blocks, False

    def merge(self, hessian: torch.Tensor, n_tokens: float) -> None:
        """Replace the running Hessian by one over ``n_tokens`` tokens (the ranks' Hessians combined)."""
        self._h, self._n, self._buffer, self._waiting_n, self._waiting_rows = hessian, n_tokens, None, 0, 0
        self._mirrored = True

    @property
    def hessian(self) -> torch.Tensor:
        """``2/n X^T X`` (C_in, C_in) float32. The live buffer, not a copy: do not modify it."""
        self._flush()
        self._buffer = None                  # read once the layer's samples are in: the buffer is not needed again
        if self._h is None or self.n_tokens == 0:
            raise ValueError("the Hessian accumulator saw no calibration tokens; run calibration data through the layer first")
        if not self._mirrored:
            mirror_upper_(self._h, self._blocks)
            self._mirrored = True
        return self._h
