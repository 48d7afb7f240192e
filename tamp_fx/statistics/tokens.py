"""Token selection: which calibration tokens' inputs set a linear's statistics.

``all`` every token (Wanda, SparseGPT); ``amia`` attention-guided, diversity-stopped
selection (TAMP §3.2); ``attention`` the tokens whose last-row attention is above its mean;
``random`` a fixed number of random tokens (drawn from the seed and the sample's index, so
the same on any number of processes; every linear of a sample gets the same ones).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from tamp_fx.errors import TampError
from tamp_fx.registry import Registry
from tamp_fx.runtime.distributed import sample_seed
from tamp_fx.statistics.amia import select_tokens
from tamp_fx.statistics.observers import TokenSelector


def _need_attention(attention: torch.Tensor | None, name: str) -> torch.Tensor:
    if attention is None:
        raise TampError(f"token selection {name!r} needs the layer's attention, but the decoder layer has no "
                        "scaled_dot_product_attention node: load the model with attn_implementation='sdpa'")
    return attention


def _amia(outputs, attention, labels, diversity, sample):
    return select_tokens(outputs, _need_attention(attention, "amia"), diversity)


def _attention(outputs, attention, labels, diversity, sample):
    a = _need_attention(attention, "attention")                         # (N,)
    return torch.nonzero(a > a.mean()).flatten()


def _random(count: int, seed: int) -> TokenSelector:
    def select(outputs, attention, labels, diversity, sample):
        generator = torch.Generator().manual_seed(sample_seed(seed, sample))
        n = outputs.shape[0]
        return torch.randperm(n, generator=generator)[:count].sort().values
    return select


@dataclass(frozen=True)
class TokenSelection:
    name: str
    selector: Callable[..., TokenSelector | None]     # (plan config) -> selector; None: every token


TOKEN_SELECTIONS: Registry[TokenSelection] = Registry("tokens")
TOKEN_SELECTIONS.register(TokenSelection("all", lambda config: None))
TOKEN_SELECTIONS.register(TokenSelection("amia", lambda config: _amia))
TOKEN_SELECTIONS.register(TokenSelection("attention", lambda config: _attention))
TOKEN_SELECTIONS.register(TokenSelection("random", lambda config: _random(config.random_tokens, config.seed)))
