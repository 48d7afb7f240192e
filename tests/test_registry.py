"""One registry shape for every choice by name, and the choices derived from it."""
from __future__ import annotations

import doctest
from dataclasses import dataclass

import pytest

from tamp_fx import TampError, registry
from tamp_fx.allocate.strategies import ALLOCATORS
from tamp_fx.config import ALLOCATIONS, SCORE_NAMES, TOKEN_NAMES, PlanConfig
from tamp_fx.prune.scores import SCORES
from tamp_fx.prune.semi_structured import FORMATS
from tamp_fx.statistics.tokens import TOKEN_SELECTIONS
from tamp_fx.write.quantize import QUANTIZERS


@dataclass(frozen=True)
class Entry:
    name: str


def test_the_module_examples_run():
    assert doctest.testmod(registry).failed == 0


def test_entries_keep_their_order_and_a_name_is_registered_once():
    r = registry.Registry("thing")
    for name in ("b", "a", "c"):
        r.register(Entry(name))
    assert r.names() == ("b", "a", "c") and [e.name for e in r] == ["b", "a", "c"] and "a" in r and "d" not in r
    with pytest.raises(ValueError, match="'a' is registered twice"):
        r.register(Entry("a"))


@pytest.mark.parametrize("reg", [ALLOCATORS, SCORES, TOKEN_SELECTIONS, QUANTIZERS, FORMATS], ids=lambda r: r.kind)
def test_every_registry_refuses_an_unknown_name_in_one_line_naming_the_choices(reg):
    with pytest.raises(TampError) as error:
        reg["no-such-choice"]
    assert str(error.value) == f"unknown {reg.kind} 'no-such-choice': choose one of {', '.join(reg.names())}"


def test_plan_config_and_cli_choices_come_from_the_registries():
    from tamp_fx.cli.app import Allocation, Format, Quantize, Score, Tokens
    assert (ALLOCATIONS, SCORE_NAMES, TOKEN_NAMES) == (ALLOCATORS.names(), SCORES.names(), TOKEN_SELECTIONS.names())
    for choice, reg in ((Allocation, ALLOCATORS), (Score, SCORES), (Tokens, TOKEN_SELECTIONS), (Quantize, QUANTIZERS),
                        (Format, FORMATS)):
        assert tuple(c.value for c in choice) == reg.names()
    with pytest.raises(TampError, match="unknown score 'wandb': choose one of magnitude, wanda, sparsegpt"):
        PlanConfig(score="wandb")
