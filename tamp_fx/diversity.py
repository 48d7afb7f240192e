"""Diversity of a linear's output tokens within and across modalities (DAS, TAMP §3.1).

With Z's rows normalised and S_a the sum of the n_a rows of modality a:
intra similarity (S_a.S_a - n_a) / (n_a (n_a - 1)) (mean cosine over ordered pairs of distinct
tokens), inter similarity S_a.S_b / (n_a n_b); diversity = 1 - similarity. Exact up to float32
rounding of the normalised rows (sums are float64), O(N C).
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
    labels = labels.reshape(-1).long()
    present = [int(m) for m in torch.unique(labels)]
    sums = {m: z[labels == m].sum(0, dtype=torch.float64) for m in present}  # each (C,), float64
    counts = {m: int((labels == m).sum()) for m in present}
    names = {m: Modality(m).name.lower() for m in present}
    terms: dict[str, float] = {}
    for m in present:
        n = counts[m]
        if n > 1:
            terms[names[m]] = 1.0 - float((sums[m] @ sums[m] - n) / (n * (n - 1)))
    for i, a in enumerate(present):
        for b in present[i + 1:]:
            key = "-".join(sorted((names[a], names[b])))
            terms[key] = 1.0 - float(sums[a] @ sums[b] / (counts[a] * counts[b]))
    return terms


def importance(terms: dict[str, float]) -> float:
    """A linear's importance for one sample: the mean of its diversity terms."""
    return sum(terms.values()) / len(terms) if terms else 0.0
