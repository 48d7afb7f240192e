"""Tests for tamp_fx.statistics.products: float32-result products of bfloat16 factors (MKL's exact
product where this CPU has it, float32 copies where it does not) against float64, for every
operand layout the statistics pass; the symmetric Gram matrices read by SparseGPT and AMIA."""
from __future__ import annotations

import doctest
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tamp_fx.statistics import amia, hessian, products
from tamp_fx.statistics.hessian import HessianAccumulator

FAST = settings(max_examples=80, deadline=None)
HAS_EXACT = products._mkl_gemm_bf16() is not None


@pytest.fixture(params=["exact", "float32"])
def path(request, monkeypatch):
    """Each test on both paths: MKL's bfloat16 product (skipped where this CPU has none) and the
    float32 copies every other machine takes."""
    if request.param == "exact":
        if not HAS_EXACT:
            pytest.skip("no exact bfloat16 product on this CPU (MKL's cblas_gemm_bf16bf16f32 and native bfloat16)")
        calls = []
        gemm = products._mkl_gemm_bf16()

        def counted(*args):
            calls.append(args)
            return gemm(*args)
        monkeypatch.setattr(products, "_mkl_gemm_bf16", lambda: counted)
        return calls
    monkeypatch.setattr(products, "_mkl_gemm_bf16", lambda: None)
    return None


def _bound(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """What float32 summation may lose: k * 2^-23 * (|a| @ |b|), in float64."""
    return a.shape[1] * 2.0**-23 * (a.double().abs() @ b.double().abs()) + 1e-30


def _layout(t: torch.Tensor, how: str) -> torch.Tensor:
    """The same values as ``t`` (M, K) in another memory layout."""
    if how == "transposed":
        return t.T.contiguous().T                                   # strides (1, M)
    if how == "slice":                                              # a view into a wider matrix, offset
        wide = torch.full((t.shape[0] + 2, t.shape[1] + 5), float("nan"), dtype=t.dtype)
        wide[1:-1, 3:-2] = t
        return wide[1:-1, 3:-2]
    return t.contiguous()


@FAST
@given(m=st.integers(1, 33), n=st.integers(1, 33), k=st.integers(1, 70), seed=st.integers(0, 2**16),
       layouts=st.tuples(*[st.sampled_from(["contiguous", "transposed", "slice"])] * 2),
       alpha=st.sampled_from([1.0, 0.25, -3.0]), beta=st.sampled_from([0.0, 1.0, 0.5]))
def test_mm_f32_equals_float64_for_every_layout(m, n, k, seed, layouts, alpha, beta):
    for mode in ("exact", "float32"):
        mp = pytest.MonkeyPatch()
        if mode == "float32":
            mp.setattr(products, "_mkl_gemm_bf16", lambda: None)
        try:
            g = torch.Generator().manual_seed(seed)
            a = torch.randn(m, k, generator=g).bfloat16()
            b = torch.randn(k, n, generator=g).bfloat16()
            big = torch.randn(m + 1, n + 4, generator=g)
            before = big.clone()
            if beta == 0.0:
                big[1:, 2:2 + n] = float("nan")                     # not read where beta is 0
            out = big[1:, 2:2 + n]                                  # (m, n), rows contiguous, in a larger matrix
            products.mm_f32(_layout(a, layouts[0]), _layout(b, layouts[1]), out, alpha=alpha, beta=beta)
            want = alpha * (a.double() @ b.double()) + (beta * before[1:, 2:2 + n].double() if beta else 0)
            assert out.dtype == torch.float32
            assert ((out.double() - want).abs() <= abs(alpha) * _bound(a, b) + 2**-23 * want.abs()).all()
            outside = torch.ones_like(big, dtype=torch.bool)
            outside[1:, 2:2 + n] = False
            assert torch.equal(big[outside], before[outside])       # nothing written outside the view
        finally:
            mp.undo()


def test_mm_f32_calls_mkl_for_bfloat16_and_casts_the_rest(path):
    a, b = torch.randn(6, 9).bfloat16(), torch.randn(9, 4).bfloat16()
    out = torch.empty(6, 4)
    products.mm_f32(a, b, out)
    products.mm_f32(a.float(), b.float(), out)                      # float32 factors: torch's own product
    products.mm_f32(a.half(), b.half(), out)                        # float16: cast
    if path is not None:
        assert len(path) == 1
    torch.testing.assert_close(out.double(), a.double() @ b.double(), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("blocks", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("c", [1, 5, 64, 130])
def test_gram_is_exactly_symmetric_and_equals_float64(path, blocks, c):
    x = torch.randn(300, c, generator=torch.Generator().manual_seed(c)).bfloat16()   # (T, C)
    got = products.gram(x, blocks)
    assert got.dtype == torch.float32 and got.shape == (c, c)
    assert torch.equal(got, got.T)
    want = x.double().T @ x.double()
    assert ((got.double() - want).abs() <= _bound(x.T, x)).all()


def test_gram_blocks_by_path(path):
    cpu = torch.device("cpu")
    assert [products.gram_blocks(cpu, torch.float32, c) for c in (64, 576, 14336)] == [4, 4, 4]
    want = [2, 2, 6, 16, 16] if path is not None else [4] * 5
    assert [products.gram_blocks(cpu, torch.bfloat16, c) for c in (64, 576, 1536, 4096, 14336)] == want


def test_hessian_of_bfloat16_inputs_waits_in_bfloat16_where_the_product_is_exact(path, monkeypatch):
    monkeypatch.setattr(hessian, "FLUSH_ROWS", 16)
    g = torch.Generator().manual_seed(3)
    acc, seen = HessianAccumulator(), []
    for rows in (5, 9, 20, 3):
        x = torch.randn(rows, 24, generator=g).bfloat16()
        acc.add(x)
        seen.append(x.double())
        if acc._buffer is not None:
            assert acc._buffer.dtype == (torch.bfloat16 if path is not None else torch.float32)
    xs = torch.cat(seen)
    h = acc.hessian
    assert torch.equal(h, h.T)
    want = 2.0 / xs.shape[0] * xs.T @ xs
    torch.testing.assert_close(h.double(), want, rtol=1e-5, atol=1e-5)
    if path is not None:
        assert path                                                 # the products went to MKL


def test_hessian_mixing_dtypes_and_block_layouts_equals_float64(path):
    """float32 inputs (weighted tokens) and bfloat16 ones in one accumulator: each waits in its own
    dtype, and where their block layouts differ the Hessian is mirrored in between."""
    g = torch.Generator().manual_seed(4)
    acc, seen = HessianAccumulator(), []
    for i, rows in enumerate((7, 5, 11, 2, 9)):
        x = torch.randn(rows, 37, generator=g)
        x = x.bfloat16() if i % 2 else x
        acc.add(x)
        seen.append(x.double())
        xs = torch.cat(seen)
        h = acc.hessian
        assert torch.equal(h, h.T)
        torch.testing.assert_close(h.double(), 2.0 / xs.shape[0] * xs.T @ xs, rtol=1e-5, atol=1e-5)


def _cosines(y: torch.Tensor) -> torch.Tensor:
    y = y.double()
    z = y / y.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return z @ z.T


@pytest.mark.parametrize("dtype, scale", [(dtype, scale) for dtype in (torch.bfloat16, torch.float32, torch.float64)
                                          for scale in (1.0, 2.0**-30, 2.0**35, 2.0**45, 2.0**-45)]
                         + [(torch.float16, 1.0)])
def test_cosine_gram_is_symmetric_and_equals_float64(path, dtype, scale):
    """Also where the norms leave the range in which the outputs' own product keeps float32's
    precision (2^+-40): those rows are normalised first."""
    g = torch.Generator().manual_seed(int(math.log2(scale)) + 100)
    y = (torch.randn(70, 48, generator=g, dtype=torch.float64) * scale).to(dtype)
    y[5] = 0                                                        # a zero row: cosine 0 with everything
    got = amia.cosine_gram(y)
    assert got.dtype == torch.float32 and torch.equal(got, got.T)
    want = _cosines(y)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-6)
    assert not got[5].any()


def test_cosine_gram_of_bfloat16_outputs_multiplies_them_as_they_are(path):
    y = torch.randn(40, 24).bfloat16()
    amia.cosine_gram(y)
    if path is not None:
        assert len(path) == 2                                       # the two block rows of y y^T
        big = torch.randn(40, 24).bfloat16() * 2.0**50              # out of range: normalised in float32
        amia.cosine_gram(big)
        assert len(path) == 2


def test_cosine_gram_refuses_outputs_whose_norms_overflow():
    with pytest.raises(ValueError, match="finite"):
        amia.cosine_gram(torch.full((3, 4), 3e38))
    with pytest.raises(ValueError, match="finite"):
        amia.cosine_gram(torch.tensor([[1.0, float("nan")], [1.0, 0.0]]))


def test_doctests():
    assert doctest.testmod(products).failed == 0
