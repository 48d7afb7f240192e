"""Adaptive Multimodal Input Activation (AMIA): which tokens feed a linear's Wanda norm.

Per decoder layer and sample, ``a`` is the last row of the attention probabilities (N,).
Per linear and sample, in that linear's normalised output space (Z = outputs with rows
L2-normalised, G = Z Z^T):

* ``D = 1 - G``; kNN(i) = the ``k`` nearest other tokens (smallest ``D``, the token itself
  excluded; among equal distances the lower index wins);
* ``g_i = a_i + sum_{j in kNN(i)} exp(-knn_temperature * D_ij) a_j``; kernel ``K = exp(-D)``;
* greedy: take ``i* = argmax g`` over the unselected tokens (the lower index wins a tie), then
  ``g_j -= exp(-suppress_temperature * D_i*j) * max(g_i*, 0)`` for ``j`` in kNN(i*); stop as
  soon as ``MMD^2 = mean(K) + mean(K[S, S]) - 2 mean(K[:, S]) < threshold * sqrt(diversity)``
  (``S`` includes the token just added) or when every token is selected.

The selected tokens' *inputs* give the Wanda norm (:func:`selected_input_sq_sum`).

Cost: one ``O(N^2 C)`` Gram matrix (:func:`cosine_gram`, exactly symmetric, of bfloat16
outputs without float32 copies where that product is exact) plus a few ``O(N^2)`` passes
(top-k, kernel, row sums),
then each greedy step is ``O(N)``: an argmax over ``g``, at most ``k`` scalar updates of
``g``, one row of ``K`` added to the running row sums ``K[:, S].sum(1)`` (``K`` is symmetric)
and ``O(1)`` updates of the float64 sums behind ``mean(K[S, S])`` and ``mean(K[:, S])``.
The precompute runs on the device of ``outputs`` in float32; the greedy loop runs on the host
(numpy views of CPU tensors, no per-step device syncs). ``D`` is evaluated in float64 from the
float32 ``G`` only where needed (the kNN weights), and the scalar weights ``exp(...)`` are taken
with :func:`math.exp`, so a plain-Python reference given the same ``G`` reproduces ``g`` and
the selection order bit for bit.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from tamp_fx.statistics.diversity import gram_diversity_terms, importance
from tamp_fx.statistics.products import exact_bf16_products, gram

_NORM_EPS = 1e-12   # rows of Z with a smaller norm normalise to zero vectors (D = 1 to all)
#: row norms (other than 0) within which the Gram matrix of the outputs themselves, then divided by
#: the norms, loses nothing to float32's range (every |y_i . y_j| <= 2^80, terms down to 2^-110 of
#: n_i n_j kept)
_RAW_NORMS = (2.0**-40, 2.0**40)


@dataclass(frozen=True)
class AmiaParams:
    """Constants of AMIA (defaults from the design doc). The "temperatures" multiply the
    distance exactly as in the spec: weights are ``exp(-temperature * D)``.

    >>> AmiaParams()
    AmiaParams(k=3, knn_temperature=1.0, suppress_temperature=0.2, threshold=0.1)
    >>> AmiaParams(k=0)
    Traceback (most recent call last):
    ...
    ValueError: k must be an int >= 1, got 0
    """
    k: int = 3                          # neighbours per token
    knn_temperature: float = 1.0        # g_i = a_i + sum exp(-knn_temperature * D_ij) a_j
    suppress_temperature: float = 0.2   # g_j -= exp(-suppress_temperature * D_i*j) max(g_i*, 0)
    threshold: float = 0.1              # stop when MMD^2 < threshold * sqrt(diversity)

    def __post_init__(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"k must be an int >= 1, got {self.k!r}")
        for name in ("knn_temperature", "suppress_temperature", "threshold"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def _check_inputs(outputs: torch.Tensor, attention: torch.Tensor) -> None:
    if outputs.dim() != 2 or outputs.shape[0] == 0:
        raise ValueError(f"outputs must be 2-D (N, C) with N >= 1, got shape {tuple(outputs.shape)}")
    if not outputs.is_floating_point():
        raise ValueError(f"outputs must be floating point, got dtype {outputs.dtype}")
    if attention.shape != outputs.shape[:1]:
        raise ValueError(f"attention must have shape ({outputs.shape[0]},), got {tuple(attention.shape)}")
    if not bool((torch.isfinite(attention) & (attention >= 0)).all()):
        raise ValueError("attention must be finite and non-negative")


def cosine_gram(outputs: torch.Tensor) -> torch.Tensor:
    """``G = Z Z^T`` (N, N) float32 of the outputs (N, C) with their rows L2-normalised (norms
    below 1e-12 taken as 1e-12), exactly symmetric. bfloat16 outputs are multiplied as they are
    where that product is exact (:func:`~tamp_fx.statistics.products.exact_bf16_products`) and
    then divided by their norms (``y_i . y_j / (n_i n_j)``); otherwise the rows are normalised in
    float32 first. Raises ValueError where a row's norm does not fit in float32.

    >>> cosine_gram(torch.tensor([[2., 0.], [0.6, 0.8], [0., 3.]]))
    tensor([[1.0000, 0.6000, 0.0000],
            [0.6000, 1.0000, 0.8000],
            [0.0000, 0.8000, 1.0000]])
    """
    y = outputs.detach()                                                   # (N, C)
    narrow = y.dtype in (torch.bfloat16, torch.float16)                    # widened as the norm reads them
    norm = torch.linalg.vector_norm(y if narrow else y.to(torch.float32), dim=1, dtype=torch.float32)  # (N,)
    if not bool(torch.isfinite(norm).all()):
        raise ValueError("outputs must be finite (with row norms that fit in float32)")
    inverse = 1.0 / norm.clamp_min(_NORM_EPS)                              # (N,)
    raw = y.dtype == torch.bfloat16 and exact_bf16_products(y.device)    # the outputs' own product?
    nonzero = norm[norm > 0] if raw else norm[:0]                          # (<= N,)
    if nonzero.numel():
        lo, hi = (float(v) for v in torch.aminmax(nonzero))
        raw = _RAW_NORMS[0] <= lo and hi <= _RAW_NORMS[1]
    if raw:
        g = gram(y.T)                                                      # (N, N) y_i . y_j, symmetric
        return g.mul_(torch.outer(inverse, inverse))                       # (N, N) symmetric: i*j == j*i
    z = y.to(torch.float32) * inverse[:, None]                             # (N, C) unit rows
    return gram(z.T)                                                       # (N, N)


def _neighbours(sim: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """kNN of each row of the Gram matrix ``sim`` (N, N) (diagonal already -inf; k < N):
    the k largest G (= smallest D = 1 - G), ordered by (D, index); ties, including ties for
    the k-th place, go to the lower index. Returns the indices (N, k) and their G (N, k)."""
    vals, nbr = sim.topk(k + 1, dim=1)                                     # (N, k + 1) descending
    if not bool((vals[:, 1:] == vals[:, :-1]).any()):                      # no ties: already in (D, index) order
        return nbr[:, :k], vals[:, :k]
    shared = vals[:, k] == vals[:, k - 1]                                  # (N,) k-th place tied
    if bool(shared.any()):                                                 # rare: fix those rows
        rows = shared.nonzero().squeeze(1)                                 # (T,)
        sub, cut = sim[rows], vals[rows, k - 1:k]                          # (T, N), (T, 1)
        more, equal = sub > cut, sub == cut                                # (T, N)
        need = k - more.sum(1, keepdim=True)                               # (T, 1)
        take = more | (equal & (equal.cumsum(1) <= need))                  # (T, N), k per row
        nbr[rows, :k] = take.nonzero()[:, 1].view(-1, k)
    nbr = nbr[:, :k].sort(1).values                                        # (N, k) by index
    sims = sim.gather(1, nbr)                                              # (N, k)
    order = sims.argsort(dim=1, descending=True, stable=True)              # (N, k) then by D
    return nbr.gather(1, order), sims.gather(1, order)


def select_tokens_by_modality(outputs: torch.Tensor, attention: torch.Tensor, labels: torch.Tensor,
                              params: AmiaParams = AmiaParams()) -> torch.Tensor:
    """:func:`select_tokens` with the diversity the stopping threshold reads taken from the outputs
    themselves: DAS's importance over the modalities of ``labels`` (N,), the mean of
    :func:`~tamp_fx.statistics.diversity.gram_diversity_terms` of the Gram matrix the selection
    computes anyway (no second pass over the outputs).

    >>> z = torch.tensor([[1., 0.], [1., 0.], [0., 1.], [0., -1.]])
    >>> a = torch.tensor([0.4, 0.1, 0.1, 0.4])
    >>> select_tokens_by_modality(z, a, torch.zeros(4, dtype=torch.int8))   # mean cosine 0: diversity 1
    tensor([0, 3, 1])
    """
    _check_inputs(outputs, attention)
    if labels.numel() != outputs.shape[0]:
        raise ValueError(f"labels must have {outputs.shape[0]} entries, got {labels.numel()}")
    sim = cosine_gram(outputs)                                             # (N, N) G; refuses non-finite outputs
    diversity = importance(gram_diversity_terms(sim, labels))
    return _select(sim, attention, max(diversity, 0.0), params)


def select_tokens(outputs: torch.Tensor, attention: torch.Tensor, diversity: float,
                  params: AmiaParams = AmiaParams()) -> torch.Tensor:
    """Indices (int64, on the device of ``outputs``) of the tokens AMIA selects, in the order
    they were chosen.

    ``outputs`` (N, C): the linear's outputs for one sample (any float dtype; computed in
    float32). ``attention`` (N,): the last row of the layer's attention probabilities
    (non-negative). ``diversity`` >= 0 scales the stopping threshold by its square root; at 0
    the loop runs until rounding makes ``MMD^2`` negative or every token is selected.

    Tokens 0 and 1 are duplicates (``D = 0``) and tie on ``g``: the lower index goes first and
    suppresses its duplicate to ``g = 0``, so token 3 comes next; ``MMD^2`` after ``[0, 3, 1]``
    is 0.0711, below ``0.1 * sqrt(1)`` but not below ``0.1 * sqrt(0.25)``.

    >>> z = torch.tensor([[1., 0.], [1., 0.], [0., 1.], [0., -1.]])
    >>> a = torch.tensor([0.4, 0.1, 0.1, 0.4])
    >>> select_tokens(z, a, diversity=1.0)
    tensor([0, 3, 1])
    >>> select_tokens(z, a, diversity=0.25)
    tensor([0, 3, 1, 2])
    """
    _check_inputs(outputs, attention)
    diversity = float(diversity)
    if not math.isfinite(diversity) or diversity < 0:
        raise ValueError(f"diversity must be a finite number >= 0, got {diversity!r}")
    return _select(cosine_gram(outputs), attention, diversity, params)   # cosine_gram refuses non-finite outputs


def _select(sim: torch.Tensor, attention: torch.Tensor, diversity: float, params: AmiaParams) -> torch.Tensor:
    """The selection given the outputs' cosine Gram matrix ``sim`` (N, N) float32, which it overwrites."""
    n, device = sim.shape[0], sim.device
    # ---- precompute, float32 on the device of outputs: O(N^2) passes over the Gram matrix.
    # kNN on G (largest G = smallest D, without rounding 1 - G in float32); the kernel is kept
    # as K' = exp(G) = e * K (one in-place pass) and MMD^2, linear in K, is divided by e.
    if n == 1:
        return torch.zeros(1, dtype=torch.int64, device=device)
    k = min(params.k, n - 1)
    gdiag = sim.diagonal().clone()                                        # (N,)
    sim.diagonal().fill_(-math.inf)                                       # kNN excludes self
    nbr, nbr_g = _neighbours(sim, k)                                      # (N, k), (N, k)
    kern = sim.exp_()                                                     # (N, N) K' = e * K
    kdiag = gdiag.exp_()                                                   # (N,) K'_ii
    kern.diagonal().copy_(kdiag)
    colsum = kern.sum(1, dtype=torch.float64)                              # (N,) K' row = column sums

    # ---- host side: one transfer each, then numpy arrays and Python floats
    kern_np = kern.cpu().numpy()                                           # (N, N) float32
    nbr_np = nbr.cpu().numpy()                                             # (N, k) int64
    d_np = 1.0 - nbr_g.double().cpu().numpy()                              # (N, k) D_ij, float64
    colsum_np = colsum.cpu().numpy()                                       # (N,) float64
    kdiag_np = kdiag.double().cpu().numpy()                                # (N,) K'_ii
    a_np = attention.detach().double().cpu().numpy()                       # (N,)
    mean_k = math.fsum(colsum_np.tolist()) / (n * n)                       # mean(K')

    # g_i = a_i + sum over kNN(i) in (D, index) order, left to right, in float64; the weights
    # with math.exp (not numpy's exp, which may differ in the last bit) on (-t) * D as Python does
    tk, ts = params.knn_temperature, params.suppress_temperature
    w = np.fromiter(map(math.exp, ((-tk) * d_np).ravel().tolist()), dtype=np.float64,
                    count=n * k).reshape(n, k)                             # (N, k)
    g = a_np.copy()                                                        # (N,)
    for c in range(k):
        g += w[:, c] * a_np[nbr_np[:, c]]                                  # (N,)

    # ---- greedy: O(N) per step
    thr = params.threshold * math.sqrt(diversity)
    rowsum = np.zeros(n, dtype=np.float64)                                 # (N,) K'[:, S].sum(1)
    sum_ss = 0.0                                                           # K'[S, S].sum()
    sum_cs = 0.0                                                           # K'[:, S].sum()
    chosen: list[int] = []
    for m in range(1, n + 1):
        i = int(g.argmax())                                                # first max on ties
        push = max(float(g[i]), 0.0)
        g[i] = -math.inf                                                   # selected
        chosen.append(i)
        if push > 0.0:
            for j, d in zip(nbr_np[i].tolist(), d_np[i].tolist()):
                g[j] -= math.exp(-ts * d) * push
        rowsum += kern_np[i]                                               # column i = row i
        sum_ss += 2.0 * float(rowsum[i]) - float(kdiag_np[i])
        sum_cs += float(colsum_np[i])
        mmd2 = (mean_k + sum_ss / (m * m) - 2.0 * sum_cs / (n * m)) / math.e  # K = K' / e
        if mmd2 < thr:
            break
    return torch.tensor(chosen, dtype=torch.int64, device=device)


def selected_input_sq_sum(inputs: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Sum over the selected tokens of ``x^2`` per input column, float64 (C_in,), for a Wanda
    norm accumulated across samples (divide the total by the total count of selected tokens).

    >>> x = torch.tensor([[1., 2.], [3., 4.], [5., 6.]])
    >>> selected_input_sq_sum(x, torch.tensor([2, 0]))
    tensor([26., 40.], dtype=torch.float64)
    """
    if inputs.dim() != 2:
        raise ValueError(f"inputs must be 2-D (N, C_in), got shape {tuple(inputs.shape)}")
    if indices.dim() != 1 or indices.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"indices must be a 1-D integer tensor, got {indices.dtype} "
                         f"of shape {tuple(indices.shape)}")
    n = inputs.shape[0]
    if indices.numel() and not bool(((indices >= 0) & (indices < n)).all()):
        raise ValueError(f"indices must be in [0, {n})")
    x = inputs.detach().index_select(0, indices.to(inputs.device, torch.int64))  # (S, C_in)
    return x.double().square().sum(0)                                      # (C_in,)
