"""ATV token selection (Li, Qian and Han, "Mostly Text, Smart Visuals", CVPR 2026, arXiv 2603.16001).

A linear's statistics come from every text token plus the non-text tokens its decoder layer
changes most. Per layer: d = 1 - cos(x_in, x_out) for each token (the cosine distance between
the layer's input and output hidden state); d_mean(m) = the mean of d over every calibration
token of modality m; per sample, k_m = round(min(1, alpha * d_mean(m)) * N_text), at most N_m,
and the k_m tokens of modality m with the largest d are kept. Image, video and audio are each
treated on their own.
"""
from __future__ import annotations

import torch

from tamp_fx.modality import Modality
from tamp_fx.statistics.observers import SampleSums


def layer_change(hidden_in: torch.Tensor, hidden_out: torch.Tensor) -> torch.Tensor:
    """d = 1 - cos(x_in, x_out) per token: (..., N, D) twice -> (N,) float32."""
    x = hidden_in.reshape(-1, hidden_in.shape[-1]).float()           # (N, D)
    y = hidden_out.reshape(-1, hidden_out.shape[-1]).float()         # (N, D)
    return 1.0 - torch.nn.functional.cosine_similarity(x, y, dim=-1)  # (N,)


def atv_tokens(change: torch.Tensor, labels: torch.Tensor, mean_change: torch.Tensor, alpha: float) -> torch.Tensor:
    """The tokens ATV keeps in one sample, in ascending order: every text token, and for each
    other modality m the round(min(1, alpha * mean_change[m]) * N_text) tokens (at most all of
    them) of largest ``change``. change (N,), labels (N,) modality per token, mean_change (M,)."""
    labels = labels.reshape(-1).long()
    text = torch.nonzero(labels == Modality.TEXT).flatten()                # (N_text,)
    kept = [text]
    for m in Modality:
        if m == Modality.TEXT:
            continue
        idx = torch.nonzero(labels == m).flatten()                         # (N_m,)
        if idx.numel() == 0:
            continue
        k = min(idx.numel(), round(min(1.0, alpha * float(mean_change[m])) * text.numel()))
        kept.append(idx[change[idx].topk(k).indices])
    return torch.cat(kept).sort().values                                    # (K,)


class LayerChange:
    """What one decoder layer does to each calibration token: d per token of every sample, and
    d's mean per modality over all samples (gathered from every rank by
    :func:`~tamp_fx.statistics.observers.reduce_statistics`, so the same on 1 process or K)."""

    def __init__(self) -> None:
        self.per_sample: dict[int, torch.Tensor] = {}   # sample index -> (N,) d
        self.sums = SampleSums()                        # per sample: sum of d per modality (M), tokens per modality (M)
        self._kept: dict[int, torch.Tensor] = {}        # sample index -> ATV's tokens (the same for every linear)

    def add(self, sample: int, labels: torch.Tensor, hidden_in: torch.Tensor, hidden_out: torch.Tensor) -> None:
        d = layer_change(hidden_in, hidden_out)                               # (N,)
        labels = labels.reshape(-1).long().to(d.device)
        total = torch.zeros(len(Modality), dtype=torch.float64, device=d.device).index_add_(0, labels, d.double())
        count = torch.bincount(labels, minlength=len(Modality)).double()      # (M,)
        self.per_sample[sample] = d
        self.sums.add(torch.cat([total, count]))

    def sample_sums(self) -> list[SampleSums]:
        return [self.sums]

    def mean(self) -> torch.Tensor:
        """(M,) float64: mean d per modality over every calibration token (0 where absent)."""
        total = self.sums.total()
        m = len(Modality)
        return total[:m] / total[m:].clamp_min(1)

    def kept(self, sample: int, labels: torch.Tensor, alpha: float) -> torch.Tensor:
        """ATV's tokens of ``sample`` (computed once, then shared by the layer's linears)."""
        if sample not in self._kept:
            self._kept[sample] = atv_tokens(self.per_sample[sample], labels, self.mean(), alpha)
        return self._kept[sample]
