"""ECoFLaP's zeroth-order importance of the attention and MLP sub-blocks of every decoder layer.

One random perturbation z per calibration sample over all prunable weights; the two-sided
difference of the language-model loss, c = (L(theta + eps z) - L(theta - eps z)) / (2 eps),
is a directional derivative, so c z estimates the gradient without a backward pass. A block's
importance is the first-order loss change of removing it, |theta_b . g_b|, averaged over
samples and divided by its parameter count so blocks of different sizes compare per parameter.
The model is never written: perturbed weights go through ``torch.func.functional_call``.

Sample i's perturbation is drawn from the seed and i alone and its terms are summed in sample
order, so K processes (:mod:`tamp_fx.runtime.distributed`, each on its share) find the same importances.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch.func import functional_call

from tamp_fx.calibrate.program import ProgramSample
from tamp_fx.errors import TampError
from tamp_fx.modality import Modality, modality_labels
from tamp_fx.runtime import distributed
from tamp_fx.runtime.progress import Bars
from tamp_fx.statistics.observers import SampleSums


def lm_targets(sample: Mapping[str, torch.Tensor], token_ids) -> torch.Tensor:
    """Next-token targets on text tokens only (modality placeholders and padding ignored)."""
    ids = sample["input_ids"]
    labels = ids.clone()
    labels[modality_labels(ids, token_ids) != int(Modality.TEXT)] = -100
    if "attention_mask" in sample:
        labels[sample["attention_mask"] == 0] = -100
    return labels


#: the progress task of the zeroth-order pass (a phase of the plan, :class:`~tamp_fx.runtime.progress.Bars`)
ZEROTH_ORDER = "ecoflap: zeroth-order"

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
    (:func:`tamp_fx.runtime.distributed.sample_indices`)."""
    names = [n for members in blocks.values() for n in members]
    block_of = {n: b for b, members in blocks.items() for n in members}
    terms = SampleSums()                                  # per sample: c * (theta_b . z_b) per block
    with distributed.guarded(), bars.task(ZEROTH_ORDER, len(samples)) as advance:
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


_LOSS_HINT = ("ecoflap on an exported program needs its next-token loss: a program returning logits (1, N, V) "
              "whose first input is the token ids, or calibration targets sample.{i}.targets (tamp-fx export "
              "writes them); use another method for this program")


def _targets(sample: ProgramSample) -> torch.Tensor | None:
    """Next-token targets (N,) of a sample: its ``targets``, else its token ids on text tokens."""
    if sample.targets is not None:
        return sample.targets.reshape(-1).long()
    ids = sample.args[0] if sample.args else None
    if ids is None or ids.is_floating_point() or ids.dim() != 2 or ids.shape[0] != 1:
        return None
    targets = ids[0].long().clone()                                     # (N,)
    if sample.labels is not None:
        targets[sample.labels.reshape(-1) != 0] = -100                 # modality placeholders are no targets
    return targets


def program_loss(gm: torch.nn.Module, samples: Sequence[ProgramSample]):
    """ECoFLaP's loss for a program (``ep.module()``): the next-token cross entropy of its output
    taken as logits (1, N, V), on the targets of :func:`_targets` (as the Hugging Face loss:
    logits in float32, position t predicts target t+1, -100 ignored). Refused in one line for
    a program without targets or logits."""
    if any(_targets(s) is None for s in samples):
        raise TampError(_LOSS_HINT)

    def loss(sample: ProgramSample, params) -> float:
        out = torch.func.functional_call(gm, dict(params), args=tuple(sample.args))
        logits = out[0] if isinstance(out, (tuple, list)) else out
        targets = _targets(sample)
        if not (isinstance(logits, torch.Tensor) and logits.is_floating_point() and logits.dim() == 3
                and logits.shape[:2] == (1, targets.numel()) and int(targets.max()) < logits.shape[-1]):
            raise TampError(_LOSS_HINT)
        return float(torch.nn.functional.cross_entropy(logits[0, :-1].float(), targets[1:], ignore_index=-100))
    return loss
