"""Products with a float32 result, and the symmetric ``x^T x`` that the statistics take.

Two bfloat16 values multiply exactly in float32 (8-bit significands), so ``x^T x`` of bfloat16
inputs (SparseGPT's Hessian) and the Gram matrix of bfloat16 outputs (AMIA) need no float32
copies of them, only a product that accumulates in float32. torch has none on the CPU
(``mm(out_dtype=)`` is CUDA's), but the MKL inside torch's CPU library exports one,
``cblas_gemm_bf16bf16f32`` (AMX and AVX512-BF16 kernels): :func:`mm_f32` calls it where it is
there and the CPU multiplies bfloat16 natively, and casts the factors to float32 elsewhere. On a
2-core Xeon with AMX (2026-12-06): 4096 x 1536 -> 1536 x 1536 in 12 ms against float32's 65 ms,
as accurate (the same float32 accumulation; only the summation order differs).
"""
from __future__ import annotations

import ctypes
import functools
import os

import torch

from tamp_fx.runtime.placement import cpu_multiplies_natively

_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112     # CBLAS_LAYOUT, CBLAS_TRANSPOSE
_INT_MAX = 2**31 - 1                              # MKL_INT of the LP64 interface


@functools.cache
def _mkl_gemm_bf16():
    """MKL's ``cblas_gemm_bf16bf16f32`` from torch's CPU library, or None (not exported there, no
    native bfloat16 on this CPU, or ``TAMP_FX_EXACT_BF16_PRODUCTS=0``)."""
    if os.environ.get("TAMP_FX_EXACT_BF16_PRODUCTS", "1") == "0" or not cpu_multiplies_natively(torch.bfloat16):
        return None
    try:
        lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
        gemm = lib.cblas_gemm_bf16bf16f32
    except (OSError, AttributeError):
        return None
    i, p = ctypes.c_int, ctypes.c_void_p
    gemm.argtypes = [i, i, i, i, i, i, ctypes.c_float, p, i, p, i, ctypes.c_float, p, i]
    gemm.restype = None
    return gemm


def exact_bf16_products(device: torch.device) -> bool:
    """Whether :func:`mm_f32` multiplies bfloat16 factors on ``device`` without float32 copies."""
    return torch.device(device).type == "cpu" and _mkl_gemm_bf16() is not None


def _operand(t: torch.Tensor) -> tuple[int, int] | None:
    """(CBLAS transpose flag, leading dimension) of a 2-D view with one unit stride, else None."""
    if t.stride(1) == 1 and t.stride(0) >= max(1, t.shape[1]):
        return _NO_TRANS, t.stride(0)
    if t.stride(0) == 1 and t.stride(1) >= max(1, t.shape[0]):
        return _TRANS, t.stride(1)
    return None


def mm_f32(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, alpha: float = 1.0, beta: float = 0.0) -> None:
    """``out = alpha * a @ b + beta * out`` in float32 (``out`` not read where ``beta`` is 0).

    ``a`` (M, K) and ``b`` (K, N) of one dtype; ``out`` (M, N) float32, rows contiguous (a view
    into a larger matrix is fine). bfloat16 factors on a CPU with :func:`exact_bf16_products` go to
    MKL as they are; anything else is cast to float32 first.

    >>> a = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.bfloat16)
    >>> out = torch.ones(2, 2)
    >>> mm_f32(a, a.T, out, alpha=2.0, beta=1.0)
    >>> out
    tensor([[11., 23.],
            [23., 51.]])
    """
    m, k = a.shape
    n = b.shape[1]
    gemm = _mkl_gemm_bf16() if a.dtype == b.dtype == torch.bfloat16 and a.device.type == "cpu" else None
    fa, fb = (_operand(a), _operand(b)) if gemm is not None else (None, None)
    if (gemm is None or fa is None or fb is None or out.dtype != torch.float32 or out.stride(1) != 1
            or max(m, n, k, fa[1], fb[1], out.stride(0)) > _INT_MAX or 0 in (m, n, k)):
        out.addmm_(a.to(torch.float32), b.to(torch.float32), beta=beta, alpha=alpha)
        return
    gemm(_ROW_MAJOR, fa[0], fb[0], m, n, k, alpha, a.data_ptr(), fa[1], b.data_ptr(), fb[1], beta,
         out.data_ptr(), max(1, out.stride(0)))


def gram_blocks(device: torch.device, dtype: torch.dtype, c: int) -> int:
    """Block rows for :func:`upper_gram_` of a (c, c) result: where bfloat16 goes to MKL as it is,
    one per 256 columns (2 to 16: the products saved against their smaller size, best measured
    for c = 576 to 14,336 on a 2-core Xeon with AMX); 4 for float32 products (0.71x the time of
    one full product for 4096 x 1536 on a 2-core AMD EPYC)."""
    return max(2, min(16, c // 256)) if dtype == torch.bfloat16 and exact_bf16_products(device) else 4


def block_edges(c: int, blocks: int) -> list[tuple[int, int]]:
    """The ``blocks`` block rows [a, e) of a (c, c) symmetric matrix (empty ones left out)."""
    edges = [c * i // blocks for i in range(blocks + 1)]
    return [(a, e) for a, e in zip(edges, edges[1:]) if e > a]


def upper_gram_(out: torch.Tensor, x: torch.Tensor, blocks: int, alpha: float = 1.0, beta: float = 0.0) -> None:
    """``out = alpha * x^T x + beta * out`` (C, C) float32 of ``x`` (T, C), its block rows
    multiplied from their diagonal block rightwards (``2 / blocks`` of the products saved): the
    blocks below the diagonal are left as they were, for :func:`mirror_upper_`."""
    for a, e in block_edges(x.shape[1], blocks):
        mm_f32(x[:, a:e].T, x[:, a:], out[a:e, a:], alpha=alpha, beta=beta)      # (e - a, C - a)


@functools.cache
def _upper_mask(n: int, device: torch.device) -> torch.Tensor:
    return torch.ones(n, n, dtype=torch.bool, device=device).triu_()        # (n, n) diagonal and above


def mirror_upper_(out: torch.Tensor, blocks: int) -> torch.Tensor:
    """The blocks below the diagonal of ``out`` (C, C) copied from those above (as
    :func:`upper_gram_` left them), and each diagonal block's lower triangle from its upper one:
    ``out`` exactly symmetric. Returns ``out``."""
    for a, e in block_edges(out.shape[0], blocks):
        out[a:e, :a] = out[:a, a:e].T              # (e - a, a) from the block column above
        block = out[a:e, a:e]                      # (e - a, e - a): its product may round the two triangles apart
        block.copy_(torch.where(_upper_mask(e - a, out.device), block, block.T))
    return out


def gram(x: torch.Tensor, blocks: int | None = None) -> torch.Tensor:
    """``x^T x`` (C, C) float32 of ``x`` (T, C), exactly symmetric (``blocks`` None: :func:`gram_blocks`).

    >>> gram(torch.tensor([[1.0, 0.0], [1.0, 2.0]], dtype=torch.bfloat16))
    tensor([[2., 2.],
            [2., 4.]])
    """
    out = torch.empty(x.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
    blocks = gram_blocks(x.device, x.dtype, x.shape[1]) if blocks is None else blocks
    upper_gram_(out, x, blocks)
    return mirror_upper_(out, blocks)
