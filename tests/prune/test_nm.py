"""N:M patterns: the config validates them, and the dense-or-N:M chooser meets its target."""
from __future__ import annotations

import doctest
import logging

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tamp_fx import LinearPlan, PlanConfig, TampError, config
from tamp_fx.allocate import budget as allocation
from tamp_fx.allocate.budget import choose_nm
from tamp_fx.prune.scores import SCORES


@st.composite
def nm_cases(draw):
    n_groups = draw(st.integers(1, 20))
    same = draw(st.sampled_from([64, 4096]))                      # some groups share a size
    sizes = {f"g{i}": draw(st.one_of(st.just(same), st.integers(1, 5000))) for i in range(n_groups)}
    importance = {g: draw(st.one_of(st.floats(0, 10, allow_nan=False), st.sampled_from([0.0, 1.0]))) for g in sizes}
    m = draw(st.sampled_from([2, 4, 8, 16]))
    ratio = draw(st.integers(1, m - 1)) / m
    return sizes, importance, draw(st.floats(0, 1)) * ratio, ratio


@settings(max_examples=300, deadline=None)
@given(case=nm_cases())
def test_the_chooser_meets_its_target_within_one_group_and_prunes_the_least_important(case):
    sizes, importance, s, r = case
    chosen = choose_nm(sizes, importance, s, r)
    assert abs(r * sum(sizes[g] for g in chosen) - s * sum(sizes.values())) <= max(sizes.values())
    for a in chosen:                     # N:M groups are never more important than dense ones, of any size
        for b in set(sizes) - chosen:
            assert importance[a] <= importance[b]


def test_the_chooser_by_hand():
    sizes = {"a": 100, "b": 100, "c": 100, "d": 10}
    imp = {"a": 3.0, "b": 1.0, "c": 2.0, "d": 4.0}
    assert choose_nm(sizes, imp, 0.0, 0.5) == set()
    # goal 0.4 * 310 = 124: b, c make 100; a would make 150 (26 over > 24 under): stop
    assert choose_nm(sizes, imp, 0.4, 0.5) == {"b", "c"}
    # goal 0.42 * 310 = 130.2: a would make 150 (19.8 over < 30.2 under): take it, then stop before d
    assert choose_nm(sizes, imp, 0.42, 0.5) == {"a", "b", "c"}
    assert choose_nm(sizes, imp, 0.5, 0.5) == set(sizes)
    with pytest.raises(ValueError, match="ratio"):
        choose_nm(sizes, imp, 0.6, 0.5)


@pytest.mark.parametrize("pattern, message", [("3:2", "0 < N < M"), ("0:4", "0 < N < M"), ("4:4", "0 < N < M"),
                                              ("a:b", "not N:M"), ("2-4", "not N:M"), ("", "not N:M")])
def test_bad_patterns_are_refused_in_one_line(pattern, message):
    with pytest.raises(TampError, match=message) as error:
        PlanConfig(pattern=pattern)
    assert "\n" not in str(error.value)


def test_a_pattern_settles_the_sparsity_and_round_trips(caplog):
    assert PlanConfig(pattern=" 2 : 4 ").pattern == "2:4"
    assert PlanConfig(pattern="1:4").sparsity == 0.25                        # uniform: N/M
    assert PlanConfig(method="tamp", pattern="1:4").sparsity == 0.25         # DAS-guided: min(0.5, N/M)
    assert PlanConfig(method="tamp", pattern="3:4").sparsity == 0.5
    assert PlanConfig().sparsity == 0.5 and PlanConfig().nm is None
    with caplog.at_level(logging.WARNING, logger="tamp_fx.config"):
        config = PlanConfig(method="sparsegpt", pattern="4:8", sparsity=0.3)
    assert config.sparsity == 0.5 and "sparsity 0.3 is ignored" in caplog.text
    for c in (config, PlanConfig(method="das", pattern="2:4", sparsity=0.4)):
        assert PlanConfig.from_dict(c.to_dict()) == c and c.to_dict()["pattern"] == c.pattern
    assert PlanConfig.from_dict({k: v for k, v in PlanConfig().to_dict().items() if k != "pattern"}) == PlanConfig()
    with pytest.raises(TampError, match="out of reach of pattern 2:4") as error:
        PlanConfig(method="tamp", pattern="2:4", sparsity=0.6)
    assert "\n" not in str(error.value)


def test_plans_written_before_patterns_still_load():
    old = {"layer": 0, "module_name": "m.w", "shape": [4, 8], "target_sparsity": 0.5, "sparsity": 0.5,
           "group": "row", "block": "mlp", "stats": {}}
    assert LinearPlan.from_dict(old).pattern == "unstructured"


class _Stats:
    """Input statistics of a linear that saw the tokens ``x`` (t, C_in)."""

    def __init__(self, x):
        self.x = x

    def input_norm(self):
        return self.x.norm(dim=0)                                               # (C_in,)

    def hessian(self):
        return 2 / len(self.x) * self.x.T @ self.x                              # (C_in, C_in)


@pytest.mark.parametrize("score", SCORES.names())
@pytest.mark.parametrize("nm", [(2, 4), (4, 8), (1, 3)])
def test_every_score_prunes_exactly_n_of_every_m(score, nm):
    g = torch.Generator().manual_seed(0)
    n, m = nm
    weight, x = torch.randn(6, 12 * m, generator=g), torch.randn(40, 12 * m, generator=g)   # (C_out, C_in), (t, C_in)
    (mask, new_weight), = SCORES[score].decide([weight], _Stats(x), [n / m], nm)
    assert torch.all((~mask).reshape(6, 12, m).sum(-1) == n)
    assert (new_weight is not None) == (score == "sparsegpt")


@pytest.mark.parametrize("module", [allocation, config])
def test_doctests(module):
    result = doctest.testmod(module)
    assert result.attempted > 0 and result.failed == 0
