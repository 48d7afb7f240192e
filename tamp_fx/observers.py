"""Observers: modules the instrument pass calls after linear and attention nodes.

They see what flows through the graph, accumulate statistics, and return nothing, so the
graph computes exactly what it computed before.
"""
from __future__ import annotations

import torch

from tamp_fx.modality import Modality


class ObserverContext:
    """What the driver tells every observer of a layer about the sample being run."""

    def __init__(self) -> None:
        self.labels: torch.Tensor | None = None  # (N,) int8 modality per token of the current sample


class LinearObserver(torch.nn.Module):
    """Sees (input, output) of one linear; accumulates the per-column sum of squared inputs."""

    def __init__(self, context: ObserverContext) -> None:
        super().__init__()
        self.context = context
        self.sum_sq: torch.Tensor | None = None        # (C_in,) float64
        self.n_tokens = 0
        self.tokens_per_modality = torch.zeros(len(Modality), dtype=torch.long)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, z: torch.Tensor) -> None:
        x2 = x.reshape(-1, x.shape[-1]).double()        # (N, C_in)
        sq = (x2 * x2).sum(0)                           # (C_in,)
        self.sum_sq = sq if self.sum_sq is None else self.sum_sq + sq
        self.n_tokens += x2.shape[0]
        if self.context.labels is not None:
            self.tokens_per_modality += torch.bincount(self.context.labels.long().flatten(), minlength=len(Modality)).cpu()

    def input_norm(self) -> torch.Tensor:
        """Root mean square of every input column over all tokens seen: (C_in,) float32."""
        if self.sum_sq is None:
            raise RuntimeError("observer saw no tokens")
        return (self.sum_sq / self.n_tokens).sqrt().float()


def last_row_attention(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None,
                       scale: float | None) -> torch.Tensor:
    """Attention probabilities of the last query over all keys, averaged over heads.

    q (B, H, N_q, d), k (B, H_kv, N, d) with H a multiple of H_kv (grouped-query keys are
    expanded); mask broadcastable to (B, H, N_q, N), bool (True = attend) or additive float.
    Costs O(H N d): no N x N matrix is formed. Returns (B, N) float32.
    """
    d = q.shape[-1]
    scale = d ** -0.5 if scale is None else scale
    q_last = q[:, :, -1:, :].float()                                     # (B, H, 1, d)
    k = k.float().repeat_interleave(q.shape[1] // k.shape[1], dim=1)     # (B, H, N, d)
    logits = (q_last @ k.transpose(-1, -2)) * scale                     # (B, H, 1, N)
    if mask is not None:
        m = mask[..., -1:, :]                                            # (B|1, H|1, 1, N)
        logits = logits.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else logits + m.float()
    return logits.softmax(-1).mean(1).squeeze(1)                         # (B, N)


class AttentionObserver(torch.nn.Module):
    """Sees (q, k, mask) of one attention node; keeps the head-averaged last-row attention
    of every sample and the attention mass each modality received."""

    def __init__(self, context: ObserverContext) -> None:
        super().__init__()
        self.context = context
        self.last_rows: list[torch.Tensor] = []       # per sample (N,)
        self.mass_per_modality = torch.zeros(len(Modality), dtype=torch.float64)

    @torch.no_grad()
    def forward(self, q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None = None,
                scale: float | None = None) -> None:
        row = last_row_attention(q, k, mask, scale)[0].cpu()            # (N,)
        self.last_rows.append(row)
        if self.context.labels is not None:
            labels = self.context.labels.long().flatten().cpu()
            self.mass_per_modality += torch.zeros(len(Modality), dtype=torch.float64).index_add_(0, labels, row.double())
