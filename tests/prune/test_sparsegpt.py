"""Tests for tamp_fx.prune.sparsegpt: exact per-block counts, N:M, agreement with a verbatim port of
the reference ``fasterprune``, lower reconstruction error than Wanda, no-op at sparsity 0,
untouched inputs, errors, and the streaming Hessian."""
from __future__ import annotations

import doctest

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tamp_fx.prune import sparsegpt
from tamp_fx.prune.masks import keep_mask, pruned_count
from tamp_fx.prune.sparsegpt import SUB_BLOCK, sparsegpt_prune, sparsegpt_prune_shared
from tamp_fx.statistics.hessian import HessianAccumulator

FAST = settings(max_examples=40, deadline=None)


# ----------------------------------------------------------------------------- helpers

def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _correlated_inputs(n: int, c_in: int, seed: int, rank: int = 8, loud: int = 3) -> torch.Tensor:
    """X (n, C_in) = G @ A (low-rank mixing: strongly correlated columns) + small noise, with a
    few high-variance columns."""
    g = _gen(seed)
    x = torch.randn(n, rank, generator=g) @ torch.randn(rank, c_in, generator=g)  # (n, C_in)
    x = x + 0.1 * torch.randn(n, c_in, generator=g)
    loud_cols = torch.randperm(c_in, generator=g)[:loud]
    x[:, loud_cols] *= 20.0
    return x


def _hessian(x: torch.Tensor) -> torch.Tensor:
    return (2.0 / x.shape[0]) * (x.T.double() @ x.double()).float()  # (C_in, C_in)


def _reference_fasterprune(w: torch.Tensor, h: torch.Tensor, sparsity: float, prunen: int = 0, prunem: int = 0,
                           blocksize: int = 128, percdamp: float = 0.01, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Verbatim port of SparseGPT's ``fasterprune`` (mask True = pruned, threshold selection),
    computed in ``dtype`` (float64: the recomputation float32 results are held to)."""
    W = w.clone().to(dtype)
    H = h.clone().to(dtype)
    columns = W.shape[1]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    damp = percdamp * torch.mean(torch.diag(H))
    diag = torch.arange(columns)
    H[diag, diag] += damp
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    H = torch.linalg.cholesky(H, upper=True)
    Hinv = H
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        if prunen == 0:
            tmp = W1 ** 2 / (torch.diag(Hinv1).reshape((1, -1))) ** 2
            thresh = torch.sort(tmp.flatten())[0][int(tmp.numel() * sparsity)]
            mask1 = tmp <= thresh
        else:
            mask1 = torch.zeros_like(W1) == 1
        for i in range(count):
            w_ = W1[:, i]
            d = Hinv1[i, i]
            if prunen != 0 and i % prunem == 0:
                tmp = W1[:, i:(i + prunem)] ** 2 / (torch.diag(Hinv1)[i:(i + prunem)].reshape((1, -1))) ** 2
                mask1.scatter_(1, i + torch.topk(tmp, prunen, dim=1, largest=False)[1], True)
            q = w_.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err1 = (w_ - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return W


def _problem(c_out: int, c_in: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = _correlated_inputs(n, c_in, seed, rank=max(1, min(8, c_in)), loud=min(3, c_in))
    w = torch.randn(c_out, c_in, generator=_gen(seed + 1000))
    return w, _hessian(x), x


def _recon_error(x: torch.Tensor, w: torch.Tensor, w_new: torch.Tensor) -> float:
    return torch.linalg.matrix_norm(x.double() @ (w.double() - w_new.double()).T).item()


# ----------------------------------------------------------------------------- exact counts

@FAST
@given(c_out=st.integers(1, 12), c_in=st.integers(1, 40), n=st.integers(4, 80), blocksize=st.integers(1, 10),
       sparsity=st.floats(0.0, 0.95), seed=st.integers(0, 10_000))
def test_every_block_loses_exactly_pruned_count(c_out, c_in, n, blocksize, sparsity, seed):
    w, h, _ = _problem(c_out, c_in, n, seed)
    new_w, keep = sparsegpt_prune(w, h, sparsity, blocksize=blocksize)
    assert keep.dtype == torch.bool and keep.shape == w.shape
    assert new_w.dtype == w.dtype and new_w.shape == w.shape
    for i1 in range(0, c_in, blocksize):
        block = keep[:, i1:i1 + blocksize]
        assert int((~block).sum()) == pruned_count(sparsity, block.numel())
    assert torch.equal(new_w == 0, ~keep)
    assert not torch.signbit(new_w[~keep]).any()  # +0.0, never -0.0


@FAST
@given(c_out=st.integers(1, 10), groups=st.integers(1, 10), nm=st.sampled_from([(1, 2), (2, 4), (4, 8), (1, 4), (3, 4)]),
       blocks_per=st.integers(1, 4), seed=st.integers(0, 10_000))
def test_nm_exactly_n_pruned_per_group_of_m(c_out, groups, nm, blocks_per, seed):
    n, m = nm
    c_in = groups * m
    w, h, _ = _problem(c_out, c_in, 32, seed)
    new_w, keep = sparsegpt_prune(w, h, n / m, blocksize=blocks_per * m, prune_n=n, prune_m=m)
    pruned_per_group = (~keep).reshape(c_out, groups, m).sum(-1)
    assert torch.all(pruned_per_group == n)
    assert torch.equal(new_w == 0, ~keep)


# ----------------------------------------------------------------------------- faithful to the reference

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_reference_fasterprune(seed):
    # The reference prunes int(numel * s) + 1 entries per block (threshold with <=); with no ties
    # our exact-count selection at the matching sparsity must give the same mask and weights.
    c_out, c_in, blocksize = 16, 48, 16
    w, h, _ = _problem(c_out, c_in, 200, seed)
    numel = c_out * blocksize
    ref = _reference_fasterprune(w, h, 0.5, blocksize=blocksize)
    new_w, keep = sparsegpt_prune(w, h, (int(numel * 0.5) + 1) / numel, blocksize=blocksize)
    assert torch.equal(keep, ref != 0)
    torch.testing.assert_close(new_w, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("n,m", [(2, 4), (1, 2)])
def test_nm_matches_reference_fasterprune(n, m):
    w, h, _ = _problem(12, 32, 100, 7)
    ref = _reference_fasterprune(w, h, 0.0, prunen=n, prunem=m, blocksize=8)
    new_w, keep = sparsegpt_prune(w, h, n / m, blocksize=8, prune_n=n, prune_m=m)
    assert torch.equal(keep, ref != 0)
    torch.testing.assert_close(new_w, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("nm", [(0, 0), (2, 4), (1, 2), (8, 32)])
def test_sub_blocked_sweep_equals_a_float64_recomputation_of_the_reference(nm):
    """Columns go in sub-blocks of SUB_BLOCK (the reference updates the rest of the block column by
    column): the same sums in another float32 order. Held to the reference computed in float64:
    the same mask, and weights as close to it as the reference's own float32 result."""
    n, m = nm
    c_out, c_in, blocksize = 24, 256, 128                    # 2 blocks of 8 sub-blocks
    assert blocksize > 2 * SUB_BLOCK
    w, h, _ = _problem(c_out, c_in, 400, 11)
    numel = c_out * blocksize
    sparsity = (int(numel * 0.5) + 1) / numel if n == 0 else n / m     # the reference's count (see above)
    ref64 = _reference_fasterprune(w, h, 0.5, prunen=n, prunem=m, blocksize=blocksize, dtype=torch.float64)
    ref32 = _reference_fasterprune(w, h, 0.5, prunen=n, prunem=m, blocksize=blocksize)
    new_w, keep = sparsegpt_prune(w, h, sparsity, blocksize=blocksize, prune_n=n, prune_m=m)
    assert torch.equal(keep, ref64 != 0)
    ours, theirs = (new_w.double() - ref64).abs().max(), (ref32.double() - ref64).abs().max()
    assert ours <= 4 * theirs + 1e-6, (ours, theirs)        # float32's own error, give or take the order
    assert ours <= 1e-4 * ref64.abs().max(), ours


@pytest.mark.parametrize("nm", [(0, 0), (2, 4)])
def test_linears_sharing_a_hessian_pruned_in_one_sweep_equal_each_pruned_alone(nm):
    """q/k/v (or gate/up) in one sweep over their stacked rows: each keeps the mask and the weights it
    gets alone, at its own sparsity; one with nothing to prune comes back bit for bit (its dead
    input columns not zeroed either)."""
    n, m = nm
    x = _correlated_inputs(300, 64, 3)
    x[:, 5] = 0.0                                            # a dead input
    h = _hessian(x)
    g = _gen(4)
    weights = [torch.randn(rows, 64, generator=g).to(torch.bfloat16) for rows in (20, 8, 8, 12)]
    sparsities = [0.5, 0.3, 0.0, 0.7] if n == 0 else [n / m] * 4
    before = [w.clone() for w in weights]
    shared = sparsegpt_prune_shared(weights, h, sparsities, blocksize=32, prune_n=n, prune_m=m)
    for w, w0 in zip(weights, before):
        assert torch.equal(w, w0)
    storages = {new_w.untyped_storage().data_ptr() for new_w, _ in shared}
    assert len(storages) == len(weights)                     # each its own tensor, not a view of the stack
    for w, s, (new_w, keep) in zip(weights, sparsities, shared):
        alone_w, alone_keep = sparsegpt_prune(w, h, s, blocksize=32, prune_n=n, prune_m=m)
        assert torch.equal(keep, alone_keep)
        torch.testing.assert_close(new_w, alone_w, rtol=0, atol=0)
    if n == 0:
        assert torch.equal(shared[2][0].view(torch.int16), weights[2].view(torch.int16)) and shared[2][1].all()


def test_shared_sweep_bad_arguments():
    h = torch.eye(8)
    with pytest.raises(ValueError, match="one sparsity per weight"):
        sparsegpt_prune_shared([torch.randn(4, 8)], h, [0.5, 0.5])
    with pytest.raises(ValueError, match="one dtype"):
        sparsegpt_prune_shared([torch.randn(4, 8), torch.randn(4, 8).double()], h, [0.5, 0.5])
    with pytest.raises(ValueError, match="hessian"):
        sparsegpt_prune_shared([torch.randn(4, 8), torch.randn(4, 7)], h, [0.5, 0.5])


# ----------------------------------------------------------------------------- better than Wanda

@pytest.mark.parametrize("sparsity", [0.5, 0.7])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_reconstruction_error_below_wanda(seed, sparsity):
    c_out, c_in, n = 32, 96, 256
    x = _correlated_inputs(n, c_in, seed)
    w = torch.randn(c_out, c_in, generator=_gen(seed + 1))
    new_w, keep = sparsegpt_prune(w, _hessian(x), sparsity, blocksize=32)
    wanda_keep = keep_mask(w.abs() * x.norm(dim=0)[None, :], sparsity, "row")
    w_wanda = w.masked_fill(~wanda_keep, 0.0)
    assert (~keep).sum() >= (~wanda_keep).sum()  # SparseGPT prunes at least as many (rounding)
    err_sgpt, err_wanda = _recon_error(x, w, new_w), _recon_error(x, w, w_wanda)
    assert err_sgpt < err_wanda, (err_sgpt, err_wanda)


# ----------------------------------------------------------------------------- no-op, inputs, dtypes

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_sparsity_zero_is_bit_identical(dtype):
    w, h, _ = _problem(8, 20, 40, 3)
    w = w.to(dtype)
    w[0, 0] = -0.0
    new_w, keep = sparsegpt_prune(w, h, 0.0, blocksize=8)
    assert new_w.dtype == dtype and keep.all()
    assert torch.equal(new_w.view(torch.uint8), w.view(torch.uint8))  # bit for bit
    assert torch.signbit(new_w[0, 0])
    assert new_w.data_ptr() != w.data_ptr()


@pytest.mark.parametrize("nm", [(0, 0), (2, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inputs_not_modified(dtype, nm):
    w, h, _ = _problem(8, 24, 40, 4)
    w = w.to(dtype)
    w_before, h_before = w.clone(), h.clone()
    h[3, :] = 0.0  # a dead input: the reference writes into H and W for those
    h[:, 3] = 0.0
    h_before = h.clone()
    sparsity = 0.5 if nm == (0, 0) else nm[0] / nm[1]
    new_w, _ = sparsegpt_prune(w, h, sparsity, blocksize=8, prune_n=nm[0], prune_m=nm[1])
    assert torch.equal(w, w_before) and torch.equal(h, h_before)
    assert new_w.dtype == dtype


def test_dead_inputs_get_zero_weight():
    x = _correlated_inputs(64, 16, 5)
    x[:, [2, 9]] = 0.0
    w = torch.randn(6, 16, generator=_gen(5))
    new_w, keep = sparsegpt_prune(w, _hessian(x), 0.25, blocksize=8)
    assert torch.all(new_w[:, [2, 9]] == 0)
    assert not keep[:, [2, 9]].any()  # score 0: pruned before anything alive


def test_empty_weight():
    new_w, keep = sparsegpt_prune(torch.zeros(0, 4), torch.eye(4), 0.5)
    assert new_w.shape == (0, 4) and keep.shape == (0, 4)


# ----------------------------------------------------------------------------- errors

@pytest.mark.parametrize("bad", ["negative", "indefinite"])
def test_not_positive_definite_raises_one_line(bad):
    c_in = 6
    if bad == "negative":
        h = -torch.eye(c_in)
    else:
        h = torch.eye(c_in)
        h[0, 1] = h[1, 0] = 5.0
    with pytest.raises(ValueError) as info:
        sparsegpt_prune(torch.randn(4, c_in), h, 0.5)
    msg = str(info.value)
    assert "\n" not in msg and "calibration" in msg and "percdamp" in msg


def test_nan_hessian_raises():
    h = torch.eye(4)
    h[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        sparsegpt_prune(torch.randn(3, 4), h, 0.5)


@pytest.mark.parametrize("kwargs,match", [
    (dict(sparsity=1.0), "sparsity"),
    (dict(sparsity=-0.1), "sparsity"),
    (dict(sparsity=0.5, blocksize=0), "blocksize"),
    (dict(sparsity=0.5, percdamp=-1.0), "percdamp"),
    (dict(sparsity=0.5, prune_n=2, prune_m=0), "N:M"),
    (dict(sparsity=0.5, prune_n=4, prune_m=4), "N:M"),
    (dict(sparsity=0.5, prune_n=2, prune_m=4, blocksize=6), "divisible"),
    (dict(sparsity=0.3, prune_n=2, prune_m=4, blocksize=8), "sparsity=2/4"),
])
def test_bad_arguments(kwargs, match):
    sparsity = kwargs.pop("sparsity")
    with pytest.raises(ValueError, match=match):
        sparsegpt_prune(torch.randn(4, 8), torch.eye(8), sparsity, **kwargs)


def test_bad_shapes():
    with pytest.raises(ValueError, match="hessian"):
        sparsegpt_prune(torch.randn(4, 8), torch.eye(7), 0.5)
    with pytest.raises(ValueError, match="weight"):
        sparsegpt_prune(torch.randn(8), torch.eye(8), 0.5)


# ----------------------------------------------------------------------------- Hessian accumulator

def test_hessian_accumulator_equals_one_shot():
    g = _gen(11)
    batches = [torch.randn(2, 7, 12, generator=g), torch.randn(5, 12, generator=g),
               torch.randn(0, 12), torch.randn(1, 3, 1, 12, generator=g).to(torch.bfloat16)]
    acc = HessianAccumulator()
    for b in batches:
        before = b.clone()
        acc.add(b)
        assert torch.equal(b, before)
    x = torch.cat([b.reshape(-1, 12).double() for b in batches])
    assert acc.n_tokens == x.shape[0] == 22
    h = acc.hessian
    assert h.dtype == torch.float32 and h.shape == (12, 12)
    torch.testing.assert_close(h.double(), 2.0 / x.shape[0] * x.T @ x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("c_in", [1, 3, 13, 64])
def test_hessian_from_its_upper_blocks_is_exactly_symmetric_and_equals_float64_across_flushes(monkeypatch, c_in):
    from tamp_fx.statistics import hessian
    monkeypatch.setattr(hessian, "FLUSH_ROWS", 16)                 # several flushes, reads between them
    g = _gen(c_in)
    acc, seen = HessianAccumulator(), []
    for rows in (5, 20, 3, 40):
        x = torch.randn(rows, c_in, generator=g)
        acc.add(x)
        seen.append(x.double())
        h, xs = acc.hessian, torch.cat(seen)
        assert torch.equal(h, h.T)
        torch.testing.assert_close(h.double(), 2.0 / xs.shape[0] * xs.T @ xs, rtol=1e-5, atol=1e-5)


def test_hessian_waiting_inputs_fill_one_buffer_and_larger_ones_pass_straight_through(monkeypatch):
    """Inputs wait in one buffer of FLUSH_ROWS rows until the next would not fit; an input of
    FLUSH_ROWS rows or more is multiplied at once. Whatever the order, the Hessian is the float64
    one, and the buffer is gone once the Hessian is read."""
    from tamp_fx.statistics import hessian
    monkeypatch.setattr(hessian, "FLUSH_ROWS", 16)
    g = _gen(5)
    acc, seen = HessianAccumulator(), []
    for rows in (5, 9, 2, 3, 16, 7, 40, 1, 15):                   # fills, an exact fill, overflows, pass-throughs
        x = torch.randn(rows, 6, generator=g).to(torch.bfloat16)
        acc.add(x)
        seen.append(x.double())
    xs = torch.cat(seen)
    assert acc.n_tokens == xs.shape[0] == 98
    torch.testing.assert_close(acc.hessian.double(), 2.0 / xs.shape[0] * xs.T @ xs, rtol=1e-5, atol=1e-5)
    assert acc._buffer is None


def test_hessian_accumulator_errors():
    acc = HessianAccumulator()
    with pytest.raises(ValueError, match="no calibration tokens"):
        acc.hessian
    acc.add(torch.randn(3, 5))
    with pytest.raises(ValueError, match="5"):
        acc.add(torch.randn(3, 6))


def test_accumulated_hessian_drives_pruning():
    x = _correlated_inputs(128, 24, 9)
    acc = HessianAccumulator()
    for chunk in x.split(40):
        acc.add(chunk)
    w = torch.randn(8, 24, generator=_gen(9))
    a, ka = sparsegpt_prune(w, acc.hessian, 0.5, blocksize=8)
    b, kb = sparsegpt_prune(w, _hessian(x), 0.5, blocksize=8)
    assert torch.equal(ka, kb)
    torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


def test_doctests():
    assert doctest.testmod(sparsegpt).failed == 0
