"""Tests for tamp_fx.prune.masks: exact counts, lowest-score selection with positional tie-break
(against a brute-force reference), N:M, bit packing, apply_mask and hand-computed goldens."""
from __future__ import annotations

import doctest
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tamp_fx.prune import masks
from tamp_fx.prune.masks import (
    achieved_sparsity,
    apply_mask,
    keep_mask,
    nm_keep_mask,
    pack_mask,
    pruned_count,
    unpack_mask,
)

FAST = settings(max_examples=60, deadline=None)


# ----------------------------------------------------------------------------- helpers


def make_scores(seed: int, c_out: int, c_in: int, kind: str) -> torch.Tensor:
    """Scores (C_out, C_in): 'float' (few ties), 'int' (many ties, including -0.0 vs +0.0)
    or 'nan' (ties and some NaN)."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "float":
        return torch.randn(c_out, c_in, generator=gen)
    scores = torch.randint(-2, 3, (c_out, c_in), generator=gen).float()  # (C_out, C_in)
    flip = torch.rand(c_out, c_in, generator=gen) < 0.5
    scores = torch.where((scores == 0) & flip, torch.tensor(-0.0), scores)  # -0.0 ties +0.0
    if kind == "nan":
        scores[torch.rand(c_out, c_in, generator=gen) < 0.2] = float("nan")
    return scores


def ref_pruned_positions(values: list[float], k: int) -> set[int]:
    """Brute force: the k lowest values, lower position first among equal ones, NaN highest."""
    def key(j: int) -> tuple[bool, float, int]:
        v = values[j]
        return (math.isnan(v), 0.0 if math.isnan(v) else v, j)

    return set(sorted(range(len(values)), key=key)[:k])


def ref_keep_mask(scores: torch.Tensor, sparsity: float, group: str) -> torch.Tensor:
    c_out, c_in = scores.shape
    rows = scores.tolist()
    if group == "row":
        out = []
        for row in rows:
            pruned = ref_pruned_positions(row, pruned_count(sparsity, c_in))
            out.append([j not in pruned for j in range(c_in)])
        return torch.tensor(out, dtype=torch.bool).reshape(c_out, c_in)
    flat = [v for row in rows for v in row]
    pruned = ref_pruned_positions(flat, pruned_count(sparsity, len(flat)))
    return torch.tensor([i not in pruned for i in range(len(flat))], dtype=torch.bool).reshape(c_out, c_in)


def ref_nm_keep_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    out = []
    for row in scores.tolist():
        keep = []
        for start in range(0, len(row), m):
            pruned = ref_pruned_positions(row[start:start + m], n)
            keep += [j not in pruned for j in range(m)]
        out.append(keep)
    return torch.tensor(out, dtype=torch.bool).reshape(scores.shape)


shapes = st.tuples(st.integers(1, 6), st.integers(1, 24))
sparsities = st.floats(0.0, 0.99, allow_nan=False)
seeds = st.integers(0, 2**31 - 1)
kinds = st.sampled_from(["float", "int", "nan"])


# ----------------------------------------------------------------------------- pruned_count


def test_pruned_count_values():
    assert pruned_count(0.0, 10) == 0
    assert pruned_count(0.5, 4) == 2
    assert pruned_count(0.5, 5) == 2
    assert pruned_count(0.29, 100) == 29  # 0.29 * 100 == 28.999999999999996
    assert pruned_count(0.7, 10) == 7
    assert pruned_count(0.99, 0) == 0


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5])
def test_pruned_count_rejects_out_of_range(sparsity):
    with pytest.raises(ValueError, match="sparsity"):
        pruned_count(sparsity, 4)


# ----------------------------------------------------------------------------- keep_mask


@FAST
@given(shape=shapes, sparsity=sparsities, seed=seeds, kind=kinds)
def test_row_mask_matches_reference(shape, sparsity, seed, kind):
    scores = make_scores(seed, *shape, kind)
    mask = keep_mask(scores, sparsity, "row")
    assert mask.dtype == torch.bool and mask.shape == scores.shape
    k = pruned_count(sparsity, shape[1])
    assert ((~mask).sum(dim=1) == k).all()
    assert torch.equal(mask, ref_keep_mask(scores, sparsity, "row"))


@FAST
@given(shape=shapes, sparsity=sparsities, seed=seeds, kind=kinds)
def test_matrix_mask_matches_reference(shape, sparsity, seed, kind):
    scores = make_scores(seed, *shape, kind)
    mask = keep_mask(scores, sparsity, "matrix")
    assert mask.dtype == torch.bool and mask.shape == scores.shape
    assert int((~mask).sum()) == pruned_count(sparsity, scores.numel())
    assert torch.equal(mask, ref_keep_mask(scores, sparsity, "matrix"))


def test_keep_mask_does_not_modify_scores_and_is_deterministic():
    scores = make_scores(3, 16, 64, "int")
    before = scores.clone()
    first = keep_mask(scores, 0.6, "row")
    assert torch.equal(scores, before)
    assert torch.equal(first, keep_mask(scores, 0.6, "row"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_keep_mask_other_dtypes(dtype):
    scores = make_scores(5, 4, 32, "int").to(dtype)
    for group in ("row", "matrix"):
        expected = ref_keep_mask(scores.float(), 0.5, group)
        assert torch.equal(keep_mask(scores, 0.5, group), expected)


def test_keep_mask_all_equal_prunes_leading_positions():
    mask = keep_mask(torch.ones(2, 5), 0.4, "row")
    assert mask.tolist() == [[False, False, True, True, True]] * 2
    mask = keep_mask(torch.ones(2, 5), 0.4, "matrix")
    assert mask.tolist() == [[False, False, False, False, True], [True] * 5]


def test_keep_mask_unknown_group():
    with pytest.raises(ValueError, match="matrix.*row"):
        keep_mask(torch.ones(2, 2), 0.5, "column")


def test_keep_mask_rejects_non_2d():
    with pytest.raises(ValueError, match="2-D"):
        keep_mask(torch.ones(2, 2, 2), 0.5, "row")


# ----------------------------------------------------------------------------- N:M


@FAST
@given(
    c_out=st.integers(1, 5),
    blocks=st.integers(1, 5),
    nm=st.sampled_from([(0, 1), (1, 2), (2, 4), (1, 4), (3, 4), (4, 8), (2, 3)]),
    seed=seeds,
    kind=kinds,
)
def test_nm_mask_matches_reference(c_out, blocks, nm, seed, kind):
    n, m = nm
    scores = make_scores(seed, c_out, blocks * m, kind)
    mask = nm_keep_mask(scores, n, m)
    assert mask.dtype == torch.bool and mask.shape == scores.shape
    assert ((~mask).reshape(c_out, blocks, m).sum(dim=-1) == n).all()
    assert torch.equal(mask, ref_nm_keep_mask(scores, n, m))


def test_nm_rejects_indivisible_columns():
    with pytest.raises(ValueError, match="C_in=6 is not a multiple of m=4") as info:
        nm_keep_mask(torch.ones(2, 6), 2, 4)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("n,m", [(4, 4), (-1, 4), (1, 0)])
def test_nm_rejects_bad_n_m(n, m):
    with pytest.raises(ValueError):
        nm_keep_mask(torch.ones(2, 4), n, m)


# ----------------------------------------------------------------------------- goldens

# Wanda scores |W| * ||x||, with input-channel norms [1, 1, 1, 10] (and 1 beyond):
W = torch.tensor([[1.0, -2.0, 3.0, -4.0], [4.0, 3.0, -2.0, 1.0]])
NORMS = torch.tensor([1.0, 1.0, 1.0, 10.0])


def test_golden_wanda_row_and_matrix():
    scores = W.abs() * NORMS  # (C_out, C_in)
    assert scores.tolist() == [[1.0, 2.0, 3.0, 40.0], [4.0, 3.0, 2.0, 10.0]]
    F, T = False, True
    # Row 0 prunes 1, 2; row 1 prunes 2 (col 2) and 3 (col 1).
    row = keep_mask(scores, 0.5, "row")
    assert row.tolist() == [[F, F, T, T], [T, F, F, T]]
    # Whole matrix, 4 lowest of [1,2,3,40,4,3,2,10]: 1@0, 2@1, 2@6, 3@2 (3@5 is kept: later).
    assert keep_mask(scores, 0.5, "matrix").tolist() == [[F, F, F, T], [T, T, F, T]]
    pruned = apply_mask(W, row)
    assert pruned.tolist() == [[0.0, 0.0, 3.0, -4.0], [4.0, 0.0, 0.0, 1.0]]
    assert achieved_sparsity(row) == 0.5


def test_golden_2_4():
    w = torch.tensor([[1.0, -2.0, 3.0, -4.0, 5.0, -0.5, 7.0, -2.0], [4.0, 3.0, -2.0, 1.0, -1.0, 1.0, -1.0, 1.0]])
    norms = torch.tensor([1.0, 1.0, 1.0, 10.0, 1.0, 1.0, 1.0, 1.0])
    scores = w.abs() * norms  # [[1,2,3,40, 5,.5,7,2], [4,3,2,10, 1,1,1,1]]
    F, T = False, True
    assert nm_keep_mask(scores, 2, 4).tolist() == [
        [F, F, T, T, T, F, T, F],
        [T, F, F, T, F, F, T, T],  # second block all tied: the first two go
    ]


# ----------------------------------------------------------------------------- sparsity, pack


def test_achieved_sparsity():
    assert achieved_sparsity(torch.tensor([[True, False], [False, False]])) == 0.75
    assert achieved_sparsity(torch.ones(3, 3, dtype=torch.bool)) == 0.0
    assert achieved_sparsity(torch.zeros(0, 3, dtype=torch.bool)) == 0.0


@FAST
@given(shape=st.lists(st.integers(0, 9), min_size=0, max_size=3), seed=seeds)
def test_pack_unpack_round_trip(shape, seed):
    shape = tuple(shape)
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(shape, generator=gen) < 0.5
    packed = pack_mask(mask)
    assert packed.dtype == torch.uint8 and packed.dim() == 1
    assert packed.numel() == (mask.numel() + 7) // 8
    assert np.array_equal(packed.numpy(), np.packbits(mask.numpy().reshape(-1)))
    unpacked = unpack_mask(packed, shape)
    assert unpacked.dtype == torch.bool and unpacked.shape == shape
    assert torch.equal(unpacked, mask)


@FAST
@given(shape=st.lists(st.integers(0, 40), min_size=1, max_size=3), seed=seeds, keep=st.floats(0.0, 1.0),
       padding=st.integers(0, 255))
def test_the_sparsity_of_a_packed_mask_is_the_unpacked_masks(shape, seed, keep, padding):
    """Counted on the packed bits, padding bits ignored (as unpacking ignores them, whatever a file holds)."""
    shape = tuple(shape)
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < keep
    packed = pack_mask(mask)
    if mask.numel() % 8:
        packed[-1] |= padding & (0xFF >> (mask.numel() % 8))             # junk in the padding bits
    assert masks.PackedMask(packed, shape).sparsity() == achieved_sparsity(unpack_mask(packed, shape))
    assert achieved_sparsity(mask) == int((~mask).sum()) / mask.numel() if mask.numel() else True


def test_pack_msb_first_and_zero_padded():
    mask = torch.tensor([True, False, True, True, False, False, False, False, True])
    assert pack_mask(mask).tolist() == [0b10110000, 0b10000000]


def test_unpack_rejects_wrong_length():
    packed = pack_mask(torch.ones(3, 5, dtype=torch.bool))  # 2 bytes
    with pytest.raises(ValueError, match="2 bytes"):
        unpack_mask(packed, (3, 6))  # needs 3
    with pytest.raises(ValueError):
        unpack_mask(packed, (2, 2))  # needs 1


# ----------------------------------------------------------------------------- apply_mask


@FAST
@given(shape=shapes, seed=seeds, dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
def test_apply_mask(shape, seed, dtype):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(shape, generator=gen).to(dtype)
    weight[0, 0] = -0.0
    mask = torch.rand(shape, generator=gen) < 0.5
    before = weight.clone()
    out = apply_mask(weight, mask)
    assert torch.equal(weight, before) and torch.equal(torch.signbit(weight), torch.signbit(before))
    assert out.dtype == dtype and out.shape == weight.shape and out.device == weight.device
    assert out.data_ptr() != weight.data_ptr()
    assert (out[~mask] == 0).all() and not torch.signbit(out[~mask]).any()  # +0.0, never -0.0
    bits = torch.int16 if dtype != torch.float32 else torch.int32
    assert torch.equal(out[mask].view(bits), weight[mask].view(bits))  # kept: bit-identical


def test_apply_mask_shape_mismatch():
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(3, 2\)"):
        apply_mask(torch.ones(3, 2), torch.ones(2, 3, dtype=torch.bool))


# ----------------------------------------------------------------------------- docs


def test_doctests():
    result = doctest.testmod(masks)
    assert result.attempted > 0 and result.failed == 0


@given(st.integers(1, 7), st.integers(1, 9), st.integers(0, 2**16), st.sampled_from([torch.float32, torch.bfloat16]))
def test_kept_values_give_back_the_pruned_weight_bit_for_bit(rows, cols, seed, dtype):
    from tamp_fx.prune.masks import KeptValues
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(rows, cols, generator=g) < 0.5
    weight = torch.randn(rows, cols, generator=g).to(dtype)
    weight[0, 0] = -0.0                                      # a kept -0.0 stays -0.0
    weight = weight.masked_fill(~mask, 0.0)                  # as SparseGPT returns it: +0.0 where pruned
    kept = KeptValues.of(weight, mask)
    assert kept.values.numel() == int(mask.sum())
    back = kept.unpack(mask)
    assert back.dtype == dtype and torch.equal(back.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                                               weight.view(torch.int16 if dtype == torch.bfloat16 else torch.int32))


def test_kept_weights_hold_pairs_packed_and_dense_tensors_as_they_are():
    from tamp_fx.prune.masks import KeptValues, KeptWeights, PackedMask
    g = torch.Generator().manual_seed(5)
    mask = torch.rand(6, 10, generator=g) < 0.5
    weight = torch.randn(6, 10, generator=g).bfloat16().masked_fill(~mask, 0.0)
    dense = torch.randn(3, 4)
    weights = KeptWeights({"a": (KeptValues.of(weight, mask), PackedMask.of(mask)), "b": dense})
    assert list(weights) == ["a", "b"] and len(weights) == 2 and "a" in weights
    assert torch.equal(weights["a"].view(torch.int16), weight.view(torch.int16))
    assert weights["b"] is dense
    held = weights._held["a"]
    assert held[0].values.numel() == int(mask.sum())     # only the kept entries are held, not the dense weight
    del weights["a"]
    assert list(weights) == ["b"]
