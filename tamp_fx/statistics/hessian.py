"""SparseGPT's Hessian H = 2 X^T X of a linear's inputs, summed over calibration tokens."""
from __future__ import annotations

import torch

#: inputs wait to be multiplied until they fill this many rows or :data:`FLUSH_ELEMENTS` values:
#: one large ``x^T x`` is faster than many small ones (1.5x for 512 x 1536 -> 4096 x 1536 on a CPU)
FLUSH_ROWS, FLUSH_ELEMENTS = 4096, 2**24
#: ``x^T x`` is symmetric: it is multiplied in this many block rows, each from its diagonal block
#: rightwards, and the lower blocks are mirrored when read (5/8 of the products; 0.71x the time of
#: one full product for 4096 x 1536 on a 2-core CPU, 0.86x for 4096 x 576)
BLOCK_ROWS = 4


class HessianAccumulator:
    """Streaming ``H = 2/n X^T X`` (C_in, C_in) float32 over every calibration token seen.

    Kept in the reference's running-average form (``H *= n/(n+t); H += 2/(n+t) x^T x``), so
    its scale does not grow with the number of tokens; inputs are gathered into products of
    :data:`FLUSH_ROWS` rows (float32 accumulation throughout), of the upper blocks only
    (:data:`BLOCK_ROWS`): the Hessian read is exactly symmetric. Lives on the device of the first input.

    >>> acc = HessianAccumulator()
    >>> acc.add(torch.tensor([[1.0, 0.0], [1.0, 2.0]]))
    >>> acc.n_tokens, acc.hessian.tolist()
    (2, [[2.0, 2.0], [2.0, 4.0]])
    """

    def __init__(self) -> None:
        self._h: torch.Tensor | None = None  # (C_in, C_in) float32
        self._n: float = 0                   # tokens in _h
        self._buffer: torch.Tensor | None = None  # (capacity, C_in) float32: inputs not yet in _h, rows [0, _waiting_rows)
        self._waiting_rows = 0
        self._waiting_n: float = 0           # their tokens, each counted with its weight
        self._mirrored = True                # the blocks below the diagonal are up to date

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
        if self._waiting_rows + rows > capacity:
            self._flush()
        if rows >= capacity:                 # too many to wait for company: multiplied as they come
            self._multiply(x2.to(device=self._h.device, dtype=torch.float32), t)
            return
        if self._buffer is None:             # one buffer, filled in place: no list of copies to concatenate
            self._buffer = torch.empty(capacity, c_in, dtype=torch.float32, device=self._h.device)
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
        """Add ``x`` (T, C_in) float32, ``t`` tokens, to the running Hessian."""
        n = self._n + t
        self._h.mul_(self._n / n)
        for a, e in self._blocks():
            self._h[a:e, a:].addmm_(x[:, a:e].T, x[:, a:], alpha=2.0 / n)   # (e - a, C_in - a)
        self._n = n
        self._mirrored = False

    def _blocks(self) -> list[tuple[int, int]]:
        """The block rows [a, e) of the Hessian."""
        c_in = self._h.shape[0]
        edges = [c_in * i // BLOCK_ROWS for i in range(BLOCK_ROWS + 1)]
        return [(a, e) for a, e in zip(edges, edges[1:]) if e > a]

    def _mirror(self) -> None:
        for a, e in self._blocks():
            self._h[a:e, :a] = self._h[:a, a:e].T      # (e - a, a) from the block column above
            block = self._h[a:e, a:e]                  # (e - a, e - a): its product rounds the two triangles apart
            block.copy_(block.triu() + block.triu(1).T)
        self._mirrored = True

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
            self._mirror()
        return self._h
