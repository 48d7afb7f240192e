"""DAS: the streaming diversity equals its O(N^2) definition; the allocator meets its budget."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tamp_fx.allocate.budget import allocate, allocate_size_normalised, min_keep, owl_sparsities
from tamp_fx.modality import Modality
from tamp_fx.statistics.amia import cosine_gram
from tamp_fx.statistics.diversity import diversity_terms, gram_diversity_terms, importance


def quadratic_reference(z: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """The definition: mean cosine similarity over pairs, with an explicit N x N matrix."""
    zn = z.double() / z.double().norm(dim=1, keepdim=True).clamp_min(1e-12)
    sim = zn @ zn.T                                                      # (N, N)
    out = {}
    mods = sorted(set(labels.tolist()))
    for a in mods:
        idx = [i for i in range(len(labels)) if labels[i] == a]
        if len(idx) > 1:
            pairs = [sim[i, j] for i in idx for j in idx if i != j]
            out[Modality(a).name.lower()] = 1 - float(sum(pairs) / len(pairs))
    for x, a in enumerate(mods):
        for b in mods[x + 1:]:
            ia = [i for i in range(len(labels)) if labels[i] == a]
            ib = [i for i in range(len(labels)) if labels[i] == b]
            key = "-".join(sorted((Modality(a).name.lower(), Modality(b).name.lower())))
            out[key] = 1 - float(sum(sim[i, j] for i in ia for j in ib) / (len(ia) * len(ib)))
    return out


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 40), c=st.integers(1, 12), seed=st.integers(0, 10**6), zero_rows=st.integers(0, 3),
       mods=st.lists(st.sampled_from(list(Modality)), min_size=1, max_size=4, unique=True))
def test_streaming_diversity_equals_the_quadratic_definition(n, c, seed, zero_rows, mods):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, c, generator=g)
    z[:min(zero_rows, n - 1)] = 0.0          # a zero row is similar to nothing, itself included
    labels = torch.tensor([int(mods[i % len(mods)]) for i in torch.randperm(n, generator=g).tolist()])
    got, want = diversity_terms(z, labels), quadratic_reference(z, labels)
    assert got.keys() == want.keys()
    for k in want:  # rows are normalised and summed in float32: agree to float32 rounding
        assert math.isclose(got[k], want[k], abs_tol=1e-6), k


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 40), c=st.integers(1, 12), seed=st.integers(0, 10**6), zero_rows=st.integers(0, 3),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       mods=st.lists(st.sampled_from(list(Modality)), min_size=1, max_size=4, unique=True))
def test_diversity_from_the_gram_matrix_equals_the_quadratic_definition(n, c, seed, zero_rows, dtype, mods):
    # AMIA reads the diversity off the cosine Gram matrix it computes anyway: the same terms as the
    # definition (and as the streaming sums), zero rows included (normalised to zero vectors)
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, c, generator=g)
    z[:min(zero_rows, n - 1)] = 0.0
    z = z.to(dtype)
    labels = torch.tensor([int(mods[i % len(mods)]) for i in torch.randperm(n, generator=g).tolist()])
    got, want = gram_diversity_terms(cosine_gram(z), labels), quadratic_reference(z.double(), labels)
    assert got.keys() == want.keys() == diversity_terms(z, labels).keys()
    for k in want:
        assert math.isclose(got[k], want[k], abs_tol=1e-6), k


def test_float32_sums_stay_exact_to_1e6_at_thousands_of_tokens():
    # rows are normalised and summed in float32: at N = 3000 the terms still match the float64
    # O(N^2) definition (block means of the cosine matrix) to 1e-6
    g = torch.Generator().manual_seed(7)
    z = torch.randn(3000, 96, generator=g) + 2.0 * torch.randn(1, 96, generator=g)  # similar rows
    labels = (torch.rand(3000, generator=g) < 0.3).long()                        # text / image
    zn = z.double() / z.double().norm(dim=1, keepdim=True)
    sim = zn @ zn.T                                                               # (N, N) float64
    t, i = labels == 0, labels == 1
    nt, ni = int(t.sum()), int(i.sum())
    want = {"text": 1 - float((sim[t][:, t].sum() - nt) / (nt * (nt - 1))),
            "image": 1 - float((sim[i][:, i].sum() - ni) / (ni * (ni - 1))),
            "image-text": 1 - float(sim[t][:, i].mean())}
    got = diversity_terms(z, labels)
    assert got.keys() == want.keys()
    for k in want:
        assert math.isclose(got[k], want[k], abs_tol=1e-6), (k, got[k], want[k])


def test_a_single_token_modality_has_no_intra_term_and_absent_modalities_none_at_all():
    z = torch.randn(5, 3)
    terms = diversity_terms(z, torch.tensor([0, 0, 0, 0, 1]))
    assert set(terms) == {"text", "image-text"}
    assert importance(terms) == (terms["text"] + terms["image-text"]) / 2


@st.composite
def groups(draw):
    n = draw(st.integers(1, 12))
    sizes = {f"g{i}": draw(st.sampled_from([64, 128, 192, 4096, draw(st.integers(1, 5000))])) for i in range(n)}
    imp = {g: draw(st.floats(0, 10, allow_nan=False)) for g in sizes}
    s = draw(st.floats(0, 0.9))
    return sizes, imp, s, min(1.0, s + draw(st.sampled_from([0.0, 0.05, 0.1, 0.3])))


@pytest.mark.parametrize("allocator", [allocate, allocate_size_normalised])
@settings(max_examples=200, deadline=None)
@given(case=groups())
def test_the_allocators_meet_the_budget_exactly_and_honour_their_bounds(allocator, case):
    sizes, imp, s, s_max = case
    keep = allocator(sizes, imp, s, s_max)
    assert sum(keep.values()) == math.floor(sum(sizes.values()) * (1 - s) + 1e-9)
    lower = min_keep(sizes, s, s_max)
    for g, p in sizes.items():
        assert lower[g] <= keep[g] <= p
        assert lower[g] >= math.floor(p * (1 - s_max) + 1e-9)


@settings(max_examples=200, deadline=None)
@given(case=groups())
def test_among_equal_sizes_more_importance_never_means_more_sparsity(case):
    sizes, imp, s, s_max = case
    keep = allocate(sizes, imp, s, s_max)
    for a in sizes:
        for b in sizes:
            if sizes[a] == sizes[b] and imp[a] > imp[b]:
                assert keep[a] >= keep[b]


@settings(max_examples=200, deadline=None)
@given(case=groups())
def test_size_normalised_keep_fractions_are_monotone_in_importance_whatever_the_sizes(case):
    # keep_g / P_g = clip(c importance_g, lower_g / P_g, 1), rounded to whole parameters: a more
    # important group never keeps a smaller share than a less important one, up to one
    # parameter of rounding each and the bounds' own rounding
    sizes, imp, s, s_max = case
    keep = allocate_size_normalised(sizes, imp, s, s_max)
    lower = min_keep(sizes, s, s_max)
    for a in sizes:
        for b in sizes:
            if imp[a] > imp[b] and keep[b] > lower[b]:
                assert keep[a] / sizes[a] >= keep[b] / sizes[b] - 1 / sizes[a] - 1 / sizes[b], (a, b)
            if sizes[a] == sizes[b] and imp[a] > imp[b]:
                assert keep[a] >= keep[b]


@settings(max_examples=100, deadline=None)
@given(case=groups(), scale=st.floats(0.1, 100))
def test_size_normalised_shares_follow_the_formula_where_nothing_clips(case, scale):
    # P_g (1 - s) importance_g / mean importance, the mean weighted by parameters; scaling
    # every importance changes nothing
    sizes, imp, s, s_max = case
    total = sum(sizes.values())
    mean = sum(sizes[g] * imp[g] for g in sizes) / total
    if mean <= 0:
        return
    ideal = {g: sizes[g] * (1 - s) * imp[g] / mean for g in sizes}
    lower = min_keep(sizes, s, s_max)
    if any(not lower[g] <= ideal[g] <= sizes[g] for g in sizes):
        return
    keep = allocate_size_normalised(sizes, imp, s, s_max)
    for g in sizes:  # the budget is floor(sum ideal): under one parameter less in all, then rounding
        assert abs(keep[g] - ideal[g]) < 2, (g, keep[g], ideal[g])
    scaled = allocate_size_normalised(sizes, {g: scale * v for g, v in imp.items()}, s, s_max)
    assert all(abs(scaled[g] - keep[g]) <= 1 for g in sizes)  # float ties may round the other way


def test_size_normalised_versus_reference_on_unequal_sizes():
    # the reference hands out absolute counts: a 10x smaller group of equal importance gets
    # the same number of extra parameters, so it ends up nearly dense; size-normalised keeps
    # both at 1 - s. P = 100 and 1000, s = 0.5, s_max = 0.6: K = 550, floors 40 + 400
    sizes, imp = {"small": 100, "big": 1000}, {"small": 1.0, "big": 1.0}
    assert allocate(sizes, imp, 0.5, 0.6) == {"small": 95, "big": 455}
    assert allocate_size_normalised(sizes, imp, 0.5, 0.6) == {"small": 50, "big": 500}
    # zero importance everywhere: every group is treated alike, in proportion to size
    assert allocate_size_normalised(sizes, {"small": 0.0, "big": 0.0}, 0.5, 0.6) == {"small": 50, "big": 500}
    # a zero-importance group sits at its floor until the others are full
    got = allocate_size_normalised({"a": 100, "b": 100}, {"a": 1.0, "b": 0.0}, 0.3, 0.9)
    assert got == {"a": 100, "b": 40}


def test_a_hand_computed_allocation():
    # P = 100 each, s = 0.5 -> K = 150 of 300; s_max = 0.6 -> each keeps >= 40; 30 left split 1:2:3
    # -> 45, 50, 55
    assert allocate({"a": 100, "b": 100, "c": 100}, {"a": 1, "b": 2, "c": 3}, 0.5, 0.6) == {"a": 45, "b": 50, "c": 55}
    # a group that fills is capped and the rest flows to the others: K = 160; s_max = 0.9 -> floors
    # 10 each, rest 130; c would get 130 * 0.9 = 117 -> 127 > 100: capped at 100 (90 used), the 40
    # left go to a and b 1:1 -> 30 each
    got = allocate({"a": 100, "b": 100, "c": 100}, {"a": 0.5, "b": 0.5, "c": 9}, 1 - 160 / 300, 0.9)
    assert got["c"] == 100 and sum(got.values()) == 160 and got["a"] == got["b"] == 30


def test_owl_maps_outlier_ratios_to_a_band_around_the_target():
    sp = owl_sparsities({"0": 0.01, "1": 0.05, "2": 0.03}, 0.6, 0.08)
    assert math.isclose(sum(sp.values()) / 3, 0.6)
    assert math.isclose(sp["1"], 0.52) and math.isclose(sp["0"], 0.68)   # most outliers, least sparsity
