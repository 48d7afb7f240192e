"""ECoFLaP's zeroth-order importance of the attention and MLP sub-blocks of every decoder layer.

One random perturbation z per calibration sample over all prunable weights; the two-sided
difference of the language-model loss, c = (L(theta + eps z) - L(theta - eps z)) / (2 eps),
is a directional derivative, so c z estimates the gradient without a backward pass. A block's
importance is the first-order loss change of removing it, |theta_b . g_b|, averaged over
samples and divided by its parameter count so blocks of different sizes compare per parameter.
The model is never written: perturbed weights go through ``torch.func.functional_call``.

Sample i's perturbation is drawn from the seed and i alone and its terms are summed in sample
order, so K processes (:mod:`tamp_fx.distributed`, each on its share) find the same importances.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch.func import functional_call

from tamp_fx import distributed
from tamp_fx.modality import Modality, modality_labels
from tamp_fx.observers import SampleSums
from tamp_fx.progress import Bars


def lm_targets(sample: Mapping[str, torch.Tensor], token_ids) -> torch.Tensor:
    """Next-token targets on text tokens only (modality placeholders and padding ignored)."""
    ids = sample["input_ids"]
    labels = ids.clone()
    labels[modality_labels(ids, token_ids) != int(Modality.TEXT)] = -100
    if "attention_mask" in sample:
        labels[sample["attention_mask"] == 0] = -100
    return labels


#: The loss of one calibration sample with some parameters replaced: (sample, {name: tensor}) -> loss.
Loss = Callable[[Any, Mapping[str, torch.Tensor]], float]


def lm_loss(model: torch.nn.Module, token_ids) -> Loss:
    """A Hugging Face model's next-token loss on a sample's text tokens."""
    device = next(model.parameters()).device

    def loss(sample: Mapping[str, torch.Tensor], params: Mapping[str, torch.Tensor]) -> float:
        labels = lm_targets(sample, token_ids).to(device)
        sample = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in sample.items()}
        kwargs = {**sample, "labels": labels, "use_cache": False}
        return float(functional_call(model, dict(params), args=(), kwargs=kwargs).loss)
    return loss


@torch.no_grad()
def zeroth_order_block_importance(params: Mapping[str, torch.Tensor], samples: Sequence, loss: Loss,
                                  blocks: Mapping[str, list[str]], *, epsilon: float, seed: int,
                                  bars: Bars) -> dict[str, float]:
    """blocks: block name -> full parameter names of its weights (keys of ``params``).
    Returns block -> importance. Under torchrun ``samples`` is this rank's share
    (:func:`tamp_fx.distributed.sample_indices`)."""
    names = [n for members in blocks.values() for n in members]
    block_of = {n: b for b, members in blocks.items() for n in members}
    terms = SampleSums()                                  # per sample: c * (theta_b . z_b) per block
    with distributed.guarded(), bars.task("ecoflap: zeroth-order", len(samples)) as advance:
        for index, sample in zip(distributed.sample_indices(len(samples)), samples):
            generator = torch.Generator().manual_seed(distributed.sample_seed(seed, index))
            z = {n: torch.randn(params[n].shape, generator=generator, dtype=params[n].dtype).to(params[n].device)
                 for n in names}                             # drawn on the host: the same on any device
            losses = [loss(sample, {n: params[n] + sign * epsilon * z[n] for n in names}) for sign in (1.0, -1.0)]
            c = (losses[0] - losses[1]) / (2 * epsilon)
            dots = {b: 0.0 for b in blocks}
            for n in names:
                dots[block_of[n]] += float((params[n] * z[n]).sum())
            terms.add(torch.tensor([c * dots[b] for b in blocks], dtype=torch.float64))
            advance()
    terms.replace(list(distributed.gather_rows(torch.stack(terms.rows).to(distributed.world().device or "cpu")).cpu().unbind(0)))
    totals = dict(zip(blocks, terms.total().tolist()))
    sizes = {b: sum(params[n].numel() for n in members) for b, members in blocks.items()}
    return {b: abs(totals[b] / len(terms.rows)) / sizes[b] for b in blocks}
