"""Diversity of a linear's output tokens within and across modalities (DAS, TAMP §3.1).

With Z's rows normalised (a zero row stays zero) and S_a the sum of the n_a rows of modality a:
intra similarity (S_a.S_a - u_a) / (n_a (n_a - 1)) (mean cosine over ordered pairs of distinct
tokens; u_a = the sum of the rows' own dot products: n_a less the zero rows), inter similarity
S_a.S_b / (n_a n_b); diversity = 1 - similarity.

Two ways to the dot products S_a.S_b, both exact up to float32 rounding:

- :func:`diversity_terms` from the outputs, O(N C): rows normalised and summed in float32
  (torch's cascaded sums, relative error about 1e-7 at N = 512), dot products in float64;
- :func:`gram_diversity_terms` from the cosine Gram matrix G = Z Z^T (N, N) where one is at hand
  (AMIA computes it for its selection), O(N^2): S_a.S_b is the float64 sum of G over the rows of
  a and the columns of b.
"""
from __future__ import annotations

import torch

from tamp_fx.modality import Modality

_EPS = 1e-12


def _per_modality(labels: torch.Tensor, row_dots: torch.Tensor) -> tuple[torch.Tensor, list[int], list[float], list[int]]:
    """labels (N,) as int64 on the device of ``row_dots`` (N,); per modality its token count and the
    sum of its rows' dot products with themselves (one host transfer); the modalities present."""
    labels = labels.reshape(-1).long().to(row_dots.device)               # (N,)
    counts, self_dots = torch.stack([torch.bincount(labels, minlength=len(Modality)).double(),
                                     torch.bincount(labels, weights=row_dots.double(), minlength=len(Modality))]).tolist()
    counts = [int(n) for n in counts]                                    # tokens per modality
    return labels, counts, self_dots, [m for m, n in enumerate(counts) if n]


def _terms(dots: list[list[float]], self_dots: list[float], counts: list[int], present: list[int]) -> dict[str, float]:
    """The terms of the dot products ``dots`` (P, P) of the present modalities' sums, less each
    modality's rows' own (``self_dots``, per modality)."""
    names = [Modality(m).name.lower() for m in present]
    terms: dict[str, float] = {}
    for a, m in enumerate(present):
        n = counts[m]
        if n > 1:
            terms[names[a]] = 1.0 - (dots[a][a] - self_dots[m]) / (n * (n - 1))
    for a in range(len(present)):
        for b in range(a + 1, len(present)):
            key = "-".join(sorted((names[a], names[b])))
            terms[key] = 1.0 - dots[a][b] / (counts[present[a]] * counts[present[b]])
    return terms


def diversity_terms(outputs: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Every intra- and inter-modality diversity of one sample's outputs.

    outputs (N, C), labels (N,) modality ids. Keys: ``"text"`` (intra), ``"image-text"``
    (inter, names sorted). A modality with one token has no intra term.

    >>> z = torch.tensor([[1., 0.], [1., 0.], [0., 1.]])
    >>> diversity_terms(z, torch.tensor([0, 0, 1]))
    {'text': 0.0, 'image-text': 1.0}
    """
    z = outputs.reshape(-1, outputs.shape[-1]).float()                    # (N, C)
    norm = z.norm(dim=1, keepdim=True)                                   # (N, 1)
    scale = norm.clamp_min(_EPS)                                         # (N, 1)
    z = z / scale                                                        # unit rows (zero rows zero), float32
    labels, counts, self_dots, present = _per_modality(labels, (norm / scale).square().flatten())  # 1 per nonzero row
    if len(present) == 1:                                                # one modality: no gather
        sums = z.sum(0)[None]                                            # (1, C)
    else:
        rows = torch.tensor(present, device=z.device)                    # (P,)
        slot = torch.zeros(len(Modality), dtype=torch.long, device=z.device)
        slot[rows] = torch.arange(len(present), device=z.device)
        sums = z.new_zeros(len(present), z.shape[1]).index_add_(0, slot[labels], z)  # (P, C)
    sums = sums.double()                                                 # (P, C)
    return _terms((sums @ sums.T).tolist(), self_dots, counts, present)  # (P, P) S_a . S_b, float64


def gram_diversity_terms(gram: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """:func:`diversity_terms` of outputs whose cosine Gram matrix (rows normalised, zero rows
    zero) is ``gram`` (N, N), labels (N,).

    >>> z = torch.tensor([[1., 0.], [1., 0.], [0., 1.]])
    >>> gram_diversity_terms(z @ z.T, torch.tensor([0, 0, 1]))
    {'text': 0.0, 'image-text': 1.0}
    """
    labels, counts, self_dots, present = _per_modality(labels, gram.diagonal())
    if len(present) == 1:
        dots = [[float(gram.sum(dtype=torch.float64))]]                  # (1, 1)
    else:
        onehot = (labels[:, None] == torch.tensor(present, device=gram.device)).double()  # (N, P)
        dots = (onehot.T @ gram.double() @ onehot).tolist()              # (P, P) S_a . S_b
    return _terms(dots, self_dots, counts, present)


def importance(terms: dict[str, float]) -> float:
    """A linear's importance for one sample: the mean of its diversity terms."""
    return sum(terms.values()) / len(terms) if terms else 0.0
