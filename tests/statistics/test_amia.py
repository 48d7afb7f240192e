"""Tests for tamp_fx.statistics.amia: AMIA token selection against a plain from-scratch reference greedy
loop (hypothesis), a hand-checked golden, edge cases and the selected-input square sums.

The reference shares one thing with the implementation: the float32 Gram matrix of the
L2-normalised outputs (``amia.cosine_gram``, itself checked against float64 below; ``D = 1 - G``
in float64), which is
the algorithm's numerical input. Everything after that (kNN, g, the greedy loop, MMD^2 recomputed
from scratch each step) is written out plainly in float64 here, so the index sequences must
agree exactly; only the stopping step may move, when MMD^2 is within 1e-6 of the threshold
(the implementation's kernel is float32)."""
from __future__ import annotations

import doctest
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tamp_fx.statistics import amia
from tamp_fx.statistics.amia import AmiaParams, select_tokens, select_tokens_by_modality, selected_input_sq_sum
from tamp_fx.statistics.diversity import gram_diversity_terms, importance

FAST = settings(max_examples=120, deadline=None)
NEAR = 1e-6   # how close to the threshold MMD^2 must be for the stopping step to move


# ----------------------------------------------------------------------------- reference


def distances(outputs: torch.Tensor) -> torch.Tensor:
    """D = 1 - Zn Zn^T (N, N) in float64, from the float32 Gram matrix computed as the
    implementation computes it (``amia.cosine_gram``)."""
    return 1.0 - amia.cosine_gram(outputs).double()


def mmd2(kern: torch.Tensor, chosen: list[int]) -> float:
    """MMD^2 = mean(K) + mean(K[S, S]) - 2 mean(K[:, S]), from scratch."""
    s = torch.tensor(chosen)
    ss = kern.index_select(0, s).index_select(1, s)           # K[S, S]
    return (kern.mean() + ss.mean() - 2 * kern.index_select(1, s).mean()).item()


def reference(outputs, attention, diversity, params=AmiaParams(), min_steps=0):
    """Plain greedy AMIA: returns (chosen, initial g, kernel, threshold). Does not stop before
    ``min_steps`` tokens (to follow the implementation past a near-tie stop)."""
    dist = distances(outputs)
    d = dist.tolist()
    kern = torch.exp(-dist)                                   # (N, N) float64
    a = attention.double().tolist()
    n = len(a)
    k = min(params.k, n - 1)
    knn = [sorted((j for j in range(n) if j != i), key=lambda j: (d[i][j], j))[:k] for i in range(n)]
    g = []
    for i in range(n):
        gi = a[i]
        for j in knn[i]:
            gi += math.exp(-params.knn_temperature * d[i][j]) * a[j]
        g.append(gi)
    g0 = list(g)
    thr = params.threshold * math.sqrt(diversity)
    chosen: list[int] = []
    while len(chosen) < n:
        best = None
        for j in range(n):                                    # argmax, lowest index on ties
            if j not in chosen and (best is None or g[j] > g[best]):
                best = j
        chosen.append(best)
        for j in knn[best]:
            g[j] -= math.exp(-params.suppress_temperature * d[best][j]) * max(g[best], 0.0)
        if len(chosen) >= min_steps and mmd2(kern, chosen) < thr:
            break
    return chosen, g0, kern, thr


# ----------------------------------------------------------------------------- data


@st.composite
def cases(draw):
    n = draw(st.integers(1, 80))
    c = draw(st.integers(1, 40))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    rank = draw(st.integers(1, c))
    outputs = torch.randn(n, rank, generator=gen) @ torch.randn(rank, c, generator=gen)  # (N, C)
    outputs += draw(st.sampled_from([0.0, 0.1])) * torch.randn(n, c, generator=gen)
    if n >= 2 and draw(st.booleans()):                        # duplicated rows: exact ties
        pairs = draw(st.integers(1, n // 2))
        perm = torch.randperm(n, generator=gen)
        outputs[perm[:pairs]] = outputs[perm[pairs:2 * pairs]]
    if draw(st.booleans()):                                   # some zero rows
        outputs[torch.rand(n, generator=gen) < 0.1] = 0.0
    if draw(st.booleans()):                                   # few distinct values: many D ties
        outputs = outputs.round()
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
    scale = draw(st.sampled_from([0.1, 1.0, 5.0]))
    attention = torch.softmax(scale * torch.randn(n, generator=gen, dtype=torch.float64), 0)
    diversity = draw(st.sampled_from([0.0, 1.0]) | st.floats(0.0, 1.0))
    params = draw(st.just(AmiaParams()) | st.builds(
        AmiaParams, k=st.integers(1, 5), knn_temperature=st.floats(0.0, 3.0),
        suppress_temperature=st.floats(0.0, 3.0), threshold=st.floats(0.0, 0.3)))
    return outputs.to(dtype), attention.to(draw(st.sampled_from([torch.float32, torch.float64]))), \
        diversity, params


# ----------------------------------------------------------------------------- properties


@FAST
@given(cases())
def test_matches_reference(case):
    outputs, attention, diversity, params = case
    n = outputs.shape[0]
    got = select_tokens(outputs, attention, diversity, params)
    assert got.dtype == torch.int64 and got.dim() == 1
    got = got.tolist()
    assert 1 <= len(got) <= n and len(set(got)) == len(got) and all(0 <= i < n for i in got)

    ref, _, kern, thr = reference(outputs, attention, diversity, params)
    common = min(len(got), len(ref))
    assert got[:common] == ref[:common]
    if len(got) != len(ref):                                  # near-tie at the stopping step
        assert abs(mmd2(kern, got[:common]) - thr) <= NEAR
        if len(got) > len(ref):                               # the continuation still matches
            assert got == reference(outputs, attention, diversity, params, len(got))[0][:len(got)]
    if len(got) < n:
        assert mmd2(kern, got) < thr + NEAR


# ----------------------------------------------------------------------------- goldens


def test_golden_tiny():
    # Z rows e1, e1, e2, -e2 (already unit): D = [[0,0,1,1],[0,0,1,1],[1,1,0,2],[1,1,2,0]],
    # k = 3 = N - 1 so every other token is a neighbour, ordered by (D, index).
    # a = (0.4, 0.1, 0.1, 0.4); e = exp(-1) = 0.367879, e2 = exp(-2) = 0.135335.
    #   g0 = 0.4 + 1*0.1 + e*0.1 + e*0.4          = 0.5 + 0.5e           = 0.683940
    #   g1 = 0.1 + 1*0.4 + e*0.1 + e*0.4          (= g0 exactly: a tie)  = 0.683940
    #   g2 = 0.1 + e*0.4 + e*0.1 + e2*0.4         = 0.1 + 0.5e + 0.4e2  = 0.338074
    #   g3 = 0.4 + e*0.4 + e*0.1 + e2*0.1         = 0.4 + 0.5e + 0.1e2  = 0.597473
    # step 1: tie g0 = g1 -> lower index 0. Suppress by exp(-0.2 D) * 0.683940:
    #   g1 -= 1 * 0.683940 -> 0; g2, g3 -= exp(-0.2) * 0.683940 = 0.559962 -> -0.221889, 0.037511
    #   mean(K) = (6 + 8e + 2e2) / 16 = 0.575857; S={0}: 0.575857 + 1 - 2 (2 + 2e)/4 = 0.207977
    # step 2: 3 (0.037511 > 0 > ...): suppression reorders, 1 had g = g0 before.
    #   g1 -= exp(-0.2) * 0.037511 -> -0.030711; g2 -= exp(-0.4) * 0.037511 -> -0.247033
    #   S={0,3}: 0.575857 + (2 + 2e)/4 - 2 (3 + 4e + e2)/8 = 0.108083  (>= 0.1: go on)
    # step 3: 1 (-0.030711 > -0.247033).
    #   S={0,3,1}: 0.575857 + (5 + 4e)/9 - 2 (5 + 6e + e2)/12 = 0.071146
    # diversity 1 -> threshold 0.1: stop at [0, 3, 1]; diversity 0.25 -> 0.05: take 2 as well;
    # threshold 0.11 with diversity 1 stops at [0, 3] (0.108083 < 0.11).
    z = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    a = torch.tensor([0.4, 0.1, 0.1, 0.4])
    e, e2 = math.exp(-1), math.exp(-2)
    _, g0, kern, _ = reference(z, a, 1.0)
    assert g0 == pytest.approx([0.5 + 0.5 * e, 0.5 + 0.5 * e, 0.1 + 0.5 * e + 0.4 * e2,
                                0.4 + 0.5 * e + 0.1 * e2], abs=1e-7)
    assert g0[0] == g0[1]
    assert mmd2(kern, [0]) == pytest.approx(0.207977, abs=1e-6)
    assert mmd2(kern, [0, 3]) == pytest.approx(0.108083, abs=1e-6)
    assert mmd2(kern, [0, 3, 1]) == pytest.approx(0.071146, abs=1e-6)
    assert select_tokens(z, a, 1.0).tolist() == [0, 3, 1]
    assert select_tokens(z, a, 0.25).tolist() == [0, 3, 1, 2]
    assert select_tokens(z, a, 1.0, AmiaParams(threshold=0.11)).tolist() == [0, 3]
    assert select_tokens(z, a, 0.0).tolist() == [0, 3, 1, 2]


def test_knn_tie_for_last_place_goes_to_lower_index():
    # k = 1, three orthogonal tokens: every D = 1, so each kNN is the lowest other index:
    # kNN = (1, 0, 0): g = (0.2 + 0.5e, 0.5 + 0.2e, 0.3 + 0.2e) = (0.384, 0.574, 0.374).
    # 1 first, suppressing 0 by exp(-0.2) * 0.574 -> -0.086; then 2, then 0: [1, 2, 0].
    # (Ties going to the higher index would give kNN = (2, 2, 1) and the order [1, 0, 2].)
    z = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    a = torch.tensor([0.2, 0.5, 0.3])
    p = AmiaParams(k=1, threshold=0.0)
    assert select_tokens(z, a, 1.0, p).tolist() == reference(z, a, 1.0, p)[0] == [1, 2, 0]


# ----------------------------------------------------------------------------- edge cases


def test_single_token():
    assert select_tokens(torch.randn(1, 5), torch.ones(1), 0.5).tolist() == [0]
    assert select_tokens(torch.zeros(1, 5), torch.ones(1), 0.0).tolist() == [0]


@pytest.mark.parametrize("n", [2, 3])
def test_fewer_tokens_than_neighbours(n):
    gen = torch.Generator().manual_seed(n)
    z, a = torch.randn(n, 4, generator=gen), torch.softmax(torch.randn(n, generator=gen), 0)
    for div in (0.0, 0.3, 1.0):
        assert select_tokens(z, a, div).tolist() == reference(z, a, div)[0]


def test_zero_rows_do_not_nan():
    z = torch.zeros(6, 3)
    z[0] = torch.tensor([1.0, 2.0, 3.0])
    a = torch.full((6,), 1 / 6)
    got = select_tokens(z, a, 0.5).tolist()
    assert got == reference(z, a, 0.5)[0]
    # all zero: K = exp(-1) everywhere, MMD^2 = 0 after one token
    assert select_tokens(torch.zeros(5, 3), torch.full((5,), 0.2), 0.5).tolist() == [0]


def test_zero_diversity_terminates():
    gen = torch.Generator().manual_seed(0)
    z, a = torch.randn(60, 8, generator=gen), torch.softmax(torch.randn(60, generator=gen), 0)
    got = select_tokens(z, a, 0.0).tolist()
    assert len(got) == len(set(got)) <= 60
    assert got == reference(z, a, 0.0, min_steps=len(got))[0]


@FAST
@given(cases(), st.integers(0, 2**31 - 1))
def test_by_modality_is_select_tokens_at_the_outputs_own_diversity(case, seed):
    # the observers' entry point: the stopping threshold's diversity is DAS's importance of the
    # outputs over their modalities, read from the Gram matrix the selection computes
    outputs, attention, _, params = case
    labels = torch.randint(0, 3, (outputs.shape[0],), generator=torch.Generator().manual_seed(seed), dtype=torch.int8)
    diversity = max(importance(gram_diversity_terms(amia.cosine_gram(outputs), labels)), 0.0)
    got = select_tokens_by_modality(outputs, attention, labels, params)
    assert torch.equal(got, select_tokens(outputs, attention, diversity, params))


@pytest.mark.parametrize("n, value", [(64, 0.3), (100, 0.7), (257, 1.1), (512, 0.01)])
def test_by_modality_takes_identical_outputs_whose_diversity_rounds_to_either_side_of_zero(n, value):
    # every row the same: the diversity is 0 up to rounding, on either side; a hair below 0 counts as 0
    z = torch.full((n, 8), value).to(torch.bfloat16)
    labels, a = torch.zeros(n, dtype=torch.int8), torch.full((n,), 1 / n)
    diversity = importance(gram_diversity_terms(amia.cosine_gram(z), labels))
    assert abs(diversity) < 1e-5
    got = select_tokens_by_modality(z, a, labels)
    assert torch.equal(got, select_tokens(z, a, max(diversity, 0.0)))


def test_by_modality_refuses_labels_of_another_length():
    with pytest.raises(ValueError, match="labels must have 3 entries"):
        select_tokens_by_modality(torch.randn(3, 2), torch.ones(3), torch.zeros(4, dtype=torch.int8))


def test_half_precision_is_computed_in_float32():
    gen = torch.Generator().manual_seed(1)
    z, a = torch.randn(40, 16, generator=gen).half(), torch.softmax(torch.randn(40, generator=gen), 0)
    assert torch.equal(select_tokens(z, a, 0.5), select_tokens(z.float(), a, 0.5))


@pytest.mark.parametrize("kwargs", [dict(k=0), dict(k=1.5), dict(k=True), dict(threshold=-0.1),
                                    dict(knn_temperature=math.nan), dict(suppress_temperature=-1.0)])
def test_params_validation(kwargs):
    with pytest.raises(ValueError):
        AmiaParams(**kwargs)


@pytest.mark.parametrize("outputs, attention, diversity", [
    (torch.randn(3), torch.ones(3), 0.5),                    # not 2-D
    (torch.randn(0, 3), torch.ones(0), 0.5),                 # no tokens
    (torch.ones(3, 2, dtype=torch.int64), torch.ones(3), 0.5),
    (torch.randn(3, 2), torch.ones(4), 0.5),                 # length mismatch
    (torch.randn(3, 2), torch.tensor([0.5, -0.1, 0.6]), 0.5),
    (torch.tensor([[1.0, math.nan], [0.0, 1.0]]), torch.ones(2), 0.5),
    (torch.randn(3, 2), torch.ones(3), -1.0),
    (torch.randn(3, 2), torch.ones(3), math.inf),
])
def test_input_validation(outputs, attention, diversity):
    with pytest.raises(ValueError):
        select_tokens(outputs, attention, diversity)


# ----------------------------------------------------------------------------- Wanda sums


@FAST
@given(st.integers(1, 30), st.integers(1, 12), st.integers(0, 2**31 - 1), st.data())
def test_selected_input_sq_sum_brute_force(n, c, seed, data):
    x = torch.randn(n, c, generator=torch.Generator().manual_seed(seed))
    idx = data.draw(st.lists(st.integers(0, n - 1), max_size=n))
    got = selected_input_sq_sum(x, torch.tensor(idx, dtype=torch.int64))
    assert got.dtype == torch.float64 and got.shape == (c,)
    rows = x.double().tolist()
    want = [sum(rows[i][col] ** 2 for i in idx) for col in range(c)]
    assert got.tolist() == pytest.approx(want, rel=1e-12, abs=0.0)


def test_selected_input_sq_sum_validation():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError):
        selected_input_sq_sum(x, torch.tensor([4]))
    with pytest.raises(ValueError):
        selected_input_sq_sum(x, torch.tensor([0.0]))
    with pytest.raises(ValueError):
        selected_input_sq_sum(x[0], torch.tensor([0]))


# ----------------------------------------------------------------------------- docs


def test_doctests():
    result = doctest.testmod(amia)
    assert result.attempted > 0 and result.failed == 0
