"""Diversity of a linear's output tokens within and across modalities (DAS, TAMP §3.1).

With Z's rows normalised and S_a the sum of the n_a rows of modality a:
intra similarity (S_a.S_a - n_a) / (n_a (n_a - 1)) (mean cosine over ordered pairs of distinct
tokens), inter similarity S_a.S_b / (n_a n_b); diversity = 1 - similarity. Exact up to float32
rounding: rows are normalised and summed in float32 (torch's cascaded sums, relative error
about 1e-7 at N = 512), dot products are float64. O(N C).
"""
from __future__ import annotations

import torch

from tamp_fx.modality import Modality

_EPS = 1e-12


def diversity_terms(outputs: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Every intra- and inter-modality diversity of one sample's outputs.

    outputs (N, C), labels (N,) modality ids. Keys: ``"text"`` (intra), ``"image-text"``
    (inter, names sorted). A modality with one token has no intra term.

    >>> z = torch.tensor([[1., 0.], [1., 0.], [0., 1.]])
    >>> diversity_terms(z, torch.tensor([0, 0, 1]))
    {'text': 0.0, 'image-text': 1.0}
    """
    z = outputs.reshape(-1, outputs.shape[-1]).float()                    # (N, C)
    z = z / z.norm(dim=1, keepdim=True).clamp_min(_EPS)                  # unit rows, float32
    labels = labels.reshape(-1).long().to(z.device)                      # (N,)
    counts = torch.bincount(labels, minlength=len(Modality)).tolist()    # tokens per modality
    present = [m for m, n in enumerate(counts) if n]
    if len(present) == 1:                                                # one modality: no gather
        sums = z.sum(0)[None]                                            # (1, C)
    else:
        rows = torch.tensor(present, device=z.device)                    # (P,)
        slot = torch.zeros(len(Modality), dtype=torch.long, device=z.device)
        slot[rows] = torch.arange(len(present), device=z.device)
        sums = z.new_zeros(len(present), z.shape[1]).index_add_(0, slot[labels], z)  # (P, C)
    sums = sums.double()                                                 # (P, C)
    dots = (sums @ sums.T).tolist()                                      # (P, P) S_a . S_b, float64
    names = [Modality(m).name.lower() for m in present]
    terms: dict[str, float] = {}
    for a, m in enumerate(present):
        n = counts[m]
        if n > 1:
            terms[names[a]] = 1.0 - (dots[a][a] - n) / (n * (n - 1))
    for a in range(len(present)):
        for b in range(a + 1, len(present)):
            key = "-".join(sorted((names[a], names[b])))
            terms[key] = 1.0 - dots[a][b] / (counts[present[a]] * counts[present[b]])
    return terms


def importance(terms: dict[str, float]) -> float:
    """A linear's importance for one sample: the mean of its diversity terms."""
    return sum(terms.values()) / len(terms) if terms else 0.0
