"""Observers: modules the instrument pass calls after linear and attention nodes.

They see what flows through the graph, accumulate statistics, and return nothing, so the
graph computes exactly what it computed before. Statistics that need the whole sample (the
layer's attention, seen only after the q/k/v projections ran) are finished by
``finish_sample``, which the driver calls after each sample's forward.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from tamp_fx.modality import Modality
from tamp_fx.runtime import distributed
from tamp_fx.runtime.timing import SELECTION, STATISTICS, stage
from tamp_fx.statistics.diversity import diversity_terms, importance
from tamp_fx.statistics.hessian import HessianAccumulator


@dataclass(frozen=True)
class Chosen:
    """The tokens of one sample whose inputs count, and how much each counts."""

    index: torch.Tensor | None = None    # (K,) token indices; None: every token
    weight: torch.Tensor | None = None   # (K,) (or (N,) when index is None) weight per counted token; None: 1 each


#: picks the tokens whose inputs count: (outputs (N, C_out), attention (N,) | None, labels (N,),
#: the layer's ObserverContext) -> Chosen
TokenSelector = Callable[[torch.Tensor, "torch.Tensor | None", torch.Tensor, "ObserverContext"], Chosen]


class ObserverContext:
    """What the driver tells every observer of a layer about the sample being run."""

    def __init__(self) -> None:
        self.labels: torch.Tensor | None = None  # (N,) int8 modality per token of the current sample, on the layer's device
        self.sample = 0                           # its index in the full calibration list (on any rank)
        self.layer_change: Any = None             # ATV: the layer's statistics.atv.LayerChange, measured before the run
        self._whole: dict[tuple[int, bool], torch.Tensor] = {}   # every_token_row per (sample, one_modality)

    def every_token_row(self, labels: torch.Tensor, one_modality: bool) -> torch.Tensor:
        """A token-count row (2M,) float64 of the current sample where every token is chosen: 1 for
        each modality present, twice (present, share chosen). The same for every linear of the
        layer, so computed once per sample (``one_modality``: ``labels`` are all zeros); read-only."""
        key = (self.sample, one_modality)
        if key not in self._whole:
            self._whole[key] = (torch.bincount(labels, minlength=len(Modality)) > 0).double().repeat(2)
        return self._whole[key]


class SampleSums:
    """Float64 sums over calibration samples, kept as one row per sample and added up in sample
    order when read. The rows of samples that ran in other processes are gathered in by
    :func:`reduce_statistics`, so a total is the same bits on one process or K."""

    def __init__(self) -> None:
        self.rows: list[torch.Tensor] = []       # per sample (D,) float64
        self._total: torch.Tensor | None = None  # sum of rows[:_summed]
        self._summed = 0

    def add(self, row: torch.Tensor) -> None:
        self.rows.append(row.detach().reshape(-1).double())

    def replace(self, rows: list[torch.Tensor]) -> None:
        self.rows, self._total, self._summed = rows, None, 0

    def total(self) -> torch.Tensor:
        """(D,) float64: rows[0] + rows[1] + ... in that order (empty: a (0,) tensor)."""
        if not self.rows:
            return torch.zeros(0, dtype=torch.float64)
        if self._total is None:
            self._total = torch.zeros_like(self.rows[0])
        for row in self.rows[self._summed:]:
            self._total += row
        self._summed = len(self.rows)
        return self._total


class InputStats:
    """Statistics of a linear's inputs over the chosen tokens of every sample: the sum of x^2 per
    input column (Wanda's norms), or with ``hessian`` SparseGPT's Hessian instead (its score
    reads nothing else), and the tokens counted."""

    def __init__(self, hessian: bool = False) -> None:
        self.sums = SampleSums()                         # per sample: sum of x^2 per column (C_in; none with a Hessian), tokens
        self.hessian_acc = HessianAccumulator() if hessian else None

    def add(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> None:
        """Count the tokens ``x`` (..., C_in), each with its ``weight`` (T,) (None: 1 each)."""
        x = x.reshape(-1, x.shape[-1])                   # (T, C_in)
        w = None if weight is None else weight.reshape(-1).to(device=x.device, dtype=torch.float32)  # (T,)
        total = x.new_full((1,), x.shape[0], dtype=torch.float64) if w is None else w.double().sum()[None]  # no host copy
        if self.hessian_acc is not None:
            self.sums.add(total)
            if w is None:                                # converted to float32 as the accumulator copies it in
                self.hessian_acc.add(x)
            else:
                self.hessian_acc.add(x.float() * w.sqrt()[:, None], weight=float(total))
            return
        xf = x.float()                                   # float32 inputs: x itself, no copy
        sq = (xf.square() if w is None else xf * xf * w[:, None]).sum(0).double()   # (C_in,)
        self.sums.add(torch.cat([sq, total]))

    @property
    def sum_sq(self) -> torch.Tensor | None:
        """(C_in,) float64: sum of x^2 over the tokens seen (None before any, and with a Hessian)."""
        return self.sums.total()[:-1] if self.sums.rows and self.hessian_acc is None else None

    @property
    def n_tokens(self) -> float:
        """The tokens seen, each counted with its weight."""
        return float(self.sums.total()[-1]) if self.sums.rows else 0.0

    def input_norm(self) -> torch.Tensor:
        """Root mean square of every input column over the tokens seen: (C_in,) float32."""
        if self.sum_sq is None or self.n_tokens == 0:
            raise RuntimeError("observer saw no tokens" if self.hessian_acc is None else "a Hessian observer keeps no input norms")
        return (self.sum_sq / self.n_tokens).sqrt().float()

    def hessian(self) -> torch.Tensor:
        """H = 2 X^T X / n over the tokens seen, as SparseGPT uses it: (C_in, C_in) float32."""
        if self.hessian_acc is None:
            raise RuntimeError("observer collected no Hessian")
        return self.hessian_acc.hessian


#: every diversity term a sample can have: each modality (intra) and each pair (inter), in a fixed order
_NAMES = [m.name.lower() for m in Modality]
DIVERSITY_TERMS: tuple[str, ...] = (*_NAMES, *("-".join(sorted((a, b))) for i, a in enumerate(_NAMES) for b in _NAMES[i + 1:]))


class LinearObserver(torch.nn.Module):
    """Sees (input, output) of one linear.

    - ``stats``: inputs of the tokens ``selector`` picks (all tokens when it is None);
    - ``diversity``: per-sample diversity terms of the outputs, when ``track_diversity``
      (with ``all_tokens_one_modality`` every token counts as one modality);
    - ``tokens_per_modality`` / ``selected_per_modality``: what the selector saw and took.

    With ``collect_inputs=False`` (a profile that needs diversities only) ``stats`` and the
    token counts stay empty.
    """

    def __init__(self, context: ObserverContext, *, selector: TokenSelector | None = None, hessian: bool = False,
                 track_diversity: bool = False, all_tokens_one_modality: bool = False,
                 collect_inputs: bool = True) -> None:
        super().__init__()
        if not collect_inputs and (selector is not None or hessian or not track_diversity):
            raise ValueError("collect_inputs=False is for diversity-only observers (no selector, no Hessian)")
        self.context = context
        self.selector = selector
        self.collect_inputs = collect_inputs
        self.stats = InputStats(hessian)
        self.track_diversity = track_diversity
        self.all_tokens_one_modality = all_tokens_one_modality
        self.owns_stats = True               # False: a linear reading the same tensor fills ``stats`` (share_inputs)
        self.diversity_sums = SampleSums()   # per sample: term values (T), term present (T), importance
        self.token_sums = SampleSums()       # per sample: modality present (M), share of its tokens chosen (M)
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def input_only(self) -> bool:
        """Whether its statistics depend on the linear's input alone (every token counts, no
        diversity): then linears that read one tensor can share them (:meth:`share_inputs`)."""
        return self.selector is None and not self.track_diversity and self.collect_inputs

    def share_inputs(self, owner: LinearObserver) -> None:
        """Use ``owner``'s input statistics, which ``owner`` (an :attr:`input_only` observer of a
        linear that reads the same tensor, q/k/v or gate/up) computes once for both."""
        same = (owner.stats.hessian_acc is None) == (self.stats.hessian_acc is None)
        if not (self.input_only and owner.input_only and same):
            raise ValueError("only input-only observers that collect the same statistics can share them")
        self.stats, self.owns_stats = owner.stats, False

    def _labels(self, n: int, device: torch.device) -> torch.Tensor:
        labels = self.context.labels
        if labels is None or self.all_tokens_one_modality:
            return torch.zeros(n, dtype=torch.long, device=device)
        return labels.reshape(-1).long().to(device)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None) -> None:
        """``x`` the linear's input; ``z`` its output, which an :attr:`input_only` observer does not
        read (the instrument pass places those before the linear and passes no output)."""
        with stage(STATISTICS):
            self._see(x, z)

    def _see(self, x: torch.Tensor, z: torch.Tensor | None) -> None:
        x = x.detach().reshape(-1, x.shape[-1])              # (N, C_in)
        if self.input_only:
            if self.owns_stats:
                self.stats.add(x)
            self._count(None, self._labels(x.shape[0], x.device))
            return
        if z is None:
            raise ValueError("this observer reads the linear's output: pass it")
        self._pending = (x, z.detach().reshape(-1, z.shape[-1]))   # (N, C_out); finished once the sample's attention is known

    def _count(self, chosen: torch.Tensor | None, labels: torch.Tensor) -> None:
        """Count the sample's tokens per modality and the share chosen (None: all), on the
        device of ``labels`` without a host synchronisation."""
        n_mod = len(Modality)
        if chosen is None:
            one_modality = self.context.labels is None or self.all_tokens_one_modality
            self.token_sums.add(self.context.every_token_row(labels, one_modality))
            return
        per_sample_total = torch.bincount(labels, minlength=n_mod).double()                       # (M,)
        picked = labels[chosen.to(labels.device)]
        per_sample_chosen = torch.bincount(picked, minlength=n_mod).double()                      # (M,)
        present = per_sample_total > 0                                                            # (M,)
        fraction = torch.where(present, per_sample_chosen / per_sample_total.clamp_min(1), 0.0)
        self.token_sums.add(torch.cat([present.double(), fraction]))

    @torch.no_grad()
    def finish_sample(self, attention: torch.Tensor | None) -> None:
        if self._pending is None:
            return
        x, z = self._pending
        self._pending = None
        labels = self._labels(x.shape[0], x.device)
        if self.track_diversity:
            terms = diversity_terms(z, labels)
            values = [terms.get(k, 0.0) for k in DIVERSITY_TERMS]
            present = [float(k in terms) for k in DIVERSITY_TERMS]
            self.diversity_sums.add(torch.tensor([*values, *present, importance(terms)], dtype=torch.float64))
        if not self.collect_inputs:
            return
        if self.selector is None:
            chosen = Chosen()
        else:
            with stage(SELECTION):
                chosen = self.selector(z, attention, labels, self.context)
        index = None if chosen.index is None else chosen.index.to(x.device)
        self.stats.add(x if index is None else x[index], chosen.weight)
        self._count(index, labels)

    # summaries ------------------------------------------------------------------------

    def sample_sums(self) -> list[SampleSums]:
        return [self.stats.sums, self.diversity_sums, self.token_sums]

    @property
    def samples(self) -> int:
        return len(self.token_sums.rows)

    @property
    def diversity_samples(self) -> int:
        return len(self.diversity_sums.rows)

    @property
    def tokens_per_modality(self) -> torch.Tensor:
        """(M,) float64: samples each modality was present in."""
        return self.token_sums.total()[:len(Modality)] if self.samples else torch.zeros(len(Modality), dtype=torch.float64)

    @property
    def selected_per_modality(self) -> torch.Tensor:
        """(M,) float64: sum over samples of the share of the modality's tokens chosen."""
        return self.token_sums.total()[len(Modality):] if self.samples else torch.zeros(len(Modality), dtype=torch.float64)

    def diversity(self) -> dict[str, float]:
        if not self.diversity_samples:
            return {}
        t = len(DIVERSITY_TERMS)
        total = self.diversity_sums.total().tolist()
        return {k: total[i] / total[t + i] for i, k in sorted(enumerate(DIVERSITY_TERMS), key=lambda p: p[1]) if total[t + i]}

    def importance(self) -> float:
        return float(self.diversity_sums.total()[-1]) / self.diversity_samples if self.diversity_samples else 0.0

    def selected_fraction(self) -> dict[str, float]:
        """Mean share of each present modality's tokens that counted, over the samples it was in."""
        selected, tokens = self.selected_per_modality.tolist(), self.tokens_per_modality.tolist()
        return {Modality(m).name.lower(): selected[m] / tokens[m] for m in range(len(Modality)) if tokens[m] > 0}


def last_row_attention(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None,
                       scale: float | None) -> torch.Tensor:
    """Attention probabilities of the last query over all keys, averaged over heads.

    q (B, H, N_q, d), k (B, H_kv, N, d) with H a multiple of H_kv (grouped-query keys are
    expanded); mask broadcastable to (B, H, N_q, N), bool (True = attend) or additive float.
    Costs O(H N d): no N x N matrix is formed. Returns (B, N) float32.
    """
    (b, h, _, d), (h_kv, n) = q.shape, k.shape[1:3]
    scale = d ** -0.5 if scale is None else scale
    q_last = q[:, :, -1, :].float().reshape(b, h_kv, h // h_kv, d)      # (B, H_kv, G, d): G query heads per key head
    logits = (q_last @ k.float().transpose(-1, -2)) * scale             # (B, H_kv, G, N)
    logits = logits.reshape(b, h, 1, n)                                  # (B, H, 1, N)
    if mask is not None:
        m = mask[..., -1:, :]                                            # (B|1, H|1, 1, N)
        logits = logits.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else logits + m.float()
    return logits.softmax(-1).mean(1).squeeze(1)                         # (B, N)


class AttentionObserver(torch.nn.Module):
    """Sees (q, k, mask) of an SDPA node or the probabilities of an eager softmax; keeps the current sample's head-averaged
    last-row attention and the attention mass each modality received over all samples."""

    def __init__(self, context: ObserverContext) -> None:
        super().__init__()
        self.context = context
        self.current: torch.Tensor | None = None       # (N,) of the sample being run, on the layer's device
        self.mass_sums = SampleSums()                  # per sample: attention mass per modality (M,)

    @torch.no_grad()
    def forward(self, q: torch.Tensor | None, k: torch.Tensor | None, mask: torch.Tensor | None = None,
                scale: float | None = None, probs: torch.Tensor | None = None) -> None:
        """Either q, k (mask, scale) of an SDPA node, or ``probs`` (B, H, N_q, N) of an eager softmax."""
        with stage(STATISTICS):
            self._see(q, k, mask, scale, probs)

    def _see(self, q: torch.Tensor | None, k: torch.Tensor | None, mask: torch.Tensor | None,
             scale: float | None, probs: torch.Tensor | None) -> None:
        if probs is not None:
            row = probs[0, :, -1, :].float().mean(0)                     # (N,)
        else:
            row = last_row_attention(q, k, mask, scale)[0]              # (N,)
        self.current = row
        mass = torch.zeros(len(Modality), dtype=torch.float64, device=row.device)  # (M,)
        if self.context.labels is not None:
            mass.index_add_(0, self.context.labels.long().flatten().to(row.device), row.double())
        self.mass_sums.add(mass)

    def sample_sums(self) -> list[SampleSums]:
        return [self.mass_sums]

    @property
    def samples(self) -> int:
        return len(self.mass_sums.rows)

    @property
    def mass_per_modality(self) -> torch.Tensor:
        """(M,) float64: attention mass each modality received, summed over samples."""
        return self.mass_sums.total() if self.samples else torch.zeros(len(Modality), dtype=torch.float64)


def reduce_statistics(observers: Iterable[LinearObserver | AttentionObserver]) -> None:
    """Give every rank the statistics of all calibration samples (:mod:`tamp_fx.runtime.distributed`):
    per-sample rows gathered in sample order, Hessians added in rank order. One process: nothing
    to do. Call it on every rank, with the observers in the same order, between guarded blocks."""
    w = distributed.world()
    if not w.distributed:
        return
    observers = list(observers)
    tables = list({id(t): t for o in observers for t in o.sample_sums() if t.rows}.values())  # shared ones once
    if tables:
        n_local = len(tables[0].rows)
        if any(len(t.rows) != n_local for t in tables):
            raise RuntimeError(f"observers hold {sorted({len(t.rows) for t in tables})} sample rows, expected {n_local} each")
        local = torch.cat([torch.stack(t.rows).to(w.device) for t in tables], 1)  # (n_local, sum D)
        full = distributed.gather_rows(local)                                      # (n, sum D)
        start = 0
        for t in tables:
            width = t.rows[0].numel()
            t.replace(list(full[:, start:start + width].to(t.rows[0].device).unbind(0)))
            start += width
    shared = {id(o.stats): o for o in observers if getattr(o, "stats", None) is not None}.values()
    for o in shared:
        acc = o.stats.hessian_acc
        if acc is not None:                       # every rank has one: the same code ran on each
            n = distributed.total_count(acc.n_tokens)
            c_in = o.stats.sums.rows[0].numel() - 1
            local = acc.hessian if acc.n_tokens else torch.zeros(c_in, c_in, device=o.stats.sums.rows[0].device)  # (C_in, C_in)
            acc.merge(distributed.weighted_sum(local, acc.n_tokens / max(n, 1)), n)
