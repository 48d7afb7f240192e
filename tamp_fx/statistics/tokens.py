"""Token selection: which calibration tokens' inputs set a linear's statistics.

``all`` every token (Wanda, SparseGPT); ``amia`` attention-guided, diversity-stopped
selection (TAMP §3.2); ``atv`` every text token and the image (video, audio) tokens the layer
changes most (:mod:`tamp_fx.statistics.atv`); ``balanced`` every token, weighted so that each
modality of a sample counts the same in total (1 / its token count); ``attention`` the tokens
whose last-row attention is above its mean; ``random`` a fixed number of random tokens (drawn
from the seed and the sample's index, so the same on any number of processes; every linear of
a sample gets the same ones).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from tamp_fx.errors import TampError
from tamp_fx.modality import Modality
from tamp_fx.registry import Registry
from tamp_fx.runtime.distributed import sample_seed
from tamp_fx.statistics.amia import select_tokens_by_modality
from tamp_fx.statistics.observers import Chosen, ObserverContext, TokenSelector


def _need_attention(attention: torch.Tensor | None, name: str) -> torch.Tensor:
    if attention is None:
        raise TampError(f"token selection {name!r} needs the layer's attention, but the decoder layer has no "
                        "scaled_dot_product_attention node: load the model with attn_implementation='sdpa'")
    return attention


def _amia(outputs, attention, labels, context):
    return Chosen(select_tokens_by_modality(outputs, _need_attention(attention, "amia"), labels))


def _attention(outputs, attention, labels, context):
    a = _need_attention(attention, "attention")                         # (N,)
    return Chosen(torch.nonzero(a > a.mean()).flatten())


def _random(count: int, seed: int) -> TokenSelector:
    def select(outputs, attention, labels, context):
        generator = torch.Generator().manual_seed(sample_seed(seed, context.sample))
        n = outputs.shape[0]
        return Chosen(torch.randperm(n, generator=generator)[:count].sort().values)
    return select


def _atv(alpha: float) -> TokenSelector:
    def select(outputs, attention, labels, context: ObserverContext):
        return Chosen(context.layer_change.kept(context.sample, labels, alpha))
    return select


def balanced_weights(labels: torch.Tensor) -> torch.Tensor:
    """(N,) float64: 1 / the number of tokens of each token's modality in the sample."""
    labels = labels.reshape(-1).long()
    return (1.0 / torch.bincount(labels, minlength=len(Modality)).double().clamp_min(1))[labels]


def _balanced(outputs, attention, labels, context):
    return Chosen(None, balanced_weights(labels))


@dataclass(frozen=True)
class TokenSelection:
    name: str
    selector: Callable[..., TokenSelector | None]     # (plan config) -> selector; None: every token
    needs_layer_change: bool = False                  # the driver measures each layer's LayerChange first (ATV)


TOKEN_SELECTIONS: Registry[TokenSelection] = Registry("tokens")
TOKEN_SELECTIONS.register(TokenSelection("all", lambda config: None))
TOKEN_SELECTIONS.register(TokenSelection("amia", lambda config: _amia))
TOKEN_SELECTIONS.register(TokenSelection("atv", lambda config: _atv(config.atv_alpha), needs_layer_change=True))
TOKEN_SELECTIONS.register(TokenSelection("balanced", lambda config: _balanced))
TOKEN_SELECTIONS.register(TokenSelection("attention", lambda config: _attention))
TOKEN_SELECTIONS.register(TokenSelection("random", lambda config: _random(config.random_tokens, config.seed)))
