"""Pruning masks: which weights to keep, given a score per weight.

A mask is a bool tensor shaped like the weight it belongs to: ``True`` keeps the entry,
``False`` prunes it. Scores are "higher is more important" (e.g. Wanda's ``|W| * ||x||``).

Every selection here is exact and deterministic: in each comparison group exactly
:func:`pruned_count` entries are pruned, the lowest scores first, and among equal scores the
one at the lower position is pruned first (stable sort). NaN scores sort as the highest, so
they are pruned last. All functions are vectorised: no Python loop over rows or groups.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from tamp_fx.runtime.tensor_file import Layout, StoredTensor, spill

#: Valid values of the ``group`` argument of :func:`keep_mask`.
GROUPS = ("matrix", "row")

_EPS = 1e-9


def pruned_count(sparsity: float, group_size: int) -> int:
    """Number of entries to prune in a comparison group of ``group_size`` entries:
    ``floor(sparsity * group_size + 1e-9)`` (the epsilon absorbs float error such as
    ``0.29 * 100 == 28.999999999999996``).

    >>> pruned_count(0.5, 4), pruned_count(0.29, 100), pruned_count(0.3, 7)
    (2, 29, 2)
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}")
    if group_size < 0:
        raise ValueError(f"group_size must be >= 0, got {group_size!r}")
    return math.floor(sparsity * group_size + _EPS)


def _check_scores(scores: torch.Tensor) -> None:
    if scores.dim() != 2:
        raise ValueError(f"scores must be 2-D (C_out, C_in), got shape {tuple(scores.shape)}")
    if scores.is_complex() or scores.dtype == torch.bool:
        raise ValueError(f"scores must be real numbers, got dtype {scores.dtype}")


def _prune_lowest_by_sort(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep-mask pruning the ``k`` lowest entries along the last dim of ``scores`` (..., G):
    a stable ascending sort, so among equal scores the lower position is pruned first.
    Fastest for small groups (N:M blocks)."""
    mask = torch.ones(scores.shape, dtype=torch.bool, device=scores.device)  # (..., G)
    if k == 0:
        return mask
    order = torch.sort(scores, dim=-1, stable=True).indices  # (..., G), ascending
    return mask.scatter_(-1, order[..., :k], False)  # (..., G)


def _prune_lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Same result as :func:`_prune_lowest_by_sort`, by selection instead of a full sort
    (several times faster on big groups such as whole rows or matrices)."""
    if k == 0 or torch.isnan(scores).any():
        # NaN breaks the threshold comparisons below; the stable sort orders it last.
        return _prune_lowest_by_sort(scores, k)
    # Everything below the k-th smallest value goes, then the first ties of that value.
    count_dtype = torch.int32 if scores.shape[-1] < 2**31 else torch.int64
    kth = torch.kthvalue(scores, k, dim=-1, keepdim=True).values  # (..., 1)
    below = scores < kth  # (..., G)
    tied = scores == kth  # (..., G)
    n_ties_pruned = k - below.sum(dim=-1, keepdim=True, dtype=count_dtype)  # (..., 1), >= 1
    tie_rank = tied.cumsum(dim=-1, dtype=count_dtype)  # (..., G), 1-based among ties
    return ~(below | (tied & (tie_rank <= n_ties_pruned)))  # (..., G)


def keep_mask(scores: torch.Tensor, sparsity: float, group: str) -> torch.Tensor:
    """Bool keep-mask (C_out, C_in) pruning the lowest ``scores`` (C_out, C_in).

    ``group="matrix"`` prunes ``pruned_count(sparsity, C_out * C_in)`` entries of the whole
    matrix; ``group="row"`` prunes ``pruned_count(sparsity, C_in)`` entries of every row.
    Ties: the entry at the lower (row-major) position is pruned first.

    >>> s = torch.tensor([[1.0, 2.0, 3.0, 40.0], [4.0, 3.0, 2.0, 10.0]])
    >>> keep_mask(s, 0.5, "row").int().tolist()
    [[0, 0, 1, 1], [1, 0, 0, 1]]
    >>> keep_mask(s, 0.5, "matrix").int().tolist()
    [[0, 0, 0, 1], [1, 1, 0, 1]]
    """
    if group not in GROUPS:
        raise ValueError(f"unknown group {group!r}; valid groups are {', '.join(GROUPS)}")
    _check_scores(scores)
    c_out, c_in = scores.shape
    if group == "row":
        return _prune_lowest(scores, pruned_count(sparsity, c_in))  # (C_out, C_in)
    flat = scores.reshape(1, c_out * c_in)  # (1, C_out * C_in)
    mask = _prune_lowest(flat, pruned_count(sparsity, c_out * c_in))  # (1, C_out * C_in)
    return mask.reshape(c_out, c_in)  # (C_out, C_in)


def nm_keep_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """N:M keep-mask (C_out, C_in): in every row, in each consecutive block of ``m`` input
    columns, prune the ``n`` lowest ``scores`` (ties: lower column pruned first).

    >>> s = torch.tensor([[1.0, 2.0, 3.0, 40.0, 5.0, 5.0, 5.0, 5.0]])
    >>> nm_keep_mask(s, 2, 4).int().tolist()
    [[0, 0, 1, 1, 0, 0, 1, 1]]
    """
    if not (isinstance(m, int) and isinstance(n, int) and m >= 1 and 0 <= n < m):
        raise ValueError(f"N:M needs integers with 0 <= n < m, got n={n!r}, m={m!r}")
    _check_scores(scores)
    c_out, c_in = scores.shape
    if c_in % m != 0:
        raise ValueError(f"N:M sparsity needs C_in divisible by m: C_in={c_in} is not a multiple of m={m}")
    blocks = scores.reshape(c_out, c_in // m, m)  # (C_out, C_in / m, m)
    return _prune_lowest_by_sort(blocks, n).reshape(c_out, c_in)  # (C_out, C_in)


def achieved_sparsity(mask: torch.Tensor) -> float:
    """Share of pruned (``False``) entries in a bool ``mask``; 0.0 for an empty mask.

    >>> achieved_sparsity(torch.tensor([[True, False], [False, False]]))
    0.75
    """
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be bool, got dtype {mask.dtype}")
    if mask.numel() == 0:
        return 0.0
    return (mask.numel() - int(torch.count_nonzero(mask))) / mask.numel()     # one pass, no ~mask copy


_BIT_SHIFTS = torch.arange(7, -1, -1, dtype=torch.uint8)  # (8,): MSB first, like numpy.packbits


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Pack a bool ``mask`` of any shape (row-major) into uint8 (ceil(numel / 8),), 8 entries
    per byte, first entry in the most significant bit, last byte zero-padded (numpy.packbits).

    >>> pack_mask(torch.tensor([True, False, True, True, False, False, False, False, True])).tolist()
    [176, 128]
    """
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be bool, got dtype {mask.dtype}")
    bits = mask.reshape(-1).to(torch.uint8)  # (numel,)
    pad = (-bits.numel()) % 8
    if pad:
        bits = torch.cat([bits, bits.new_zeros(pad)])  # (8 * n_bytes,)
    shifts = _BIT_SHIFTS.to(bits.device)  # (8,)
    return (bits.reshape(-1, 8) << shifts).sum(dim=1, dtype=torch.uint8)  # (n_bytes,)


def check_packed(packed: torch.Tensor, shape: tuple[int, ...]) -> int:
    """The number of entries of ``shape``, or ValueError unless ``packed`` is the 1-D uint8
    :func:`pack_mask` of a mask of that shape."""
    numel = math.prod(int(d) for d in shape)
    expected = (numel + 7) // 8
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError(f"packed must be a 1-D uint8 tensor, got {packed.dtype} of shape {tuple(packed.shape)}")
    if packed.numel() != expected:
        raise ValueError(f"packed has {packed.numel()} bytes but shape {tuple(shape)} needs {expected} ({numel} entries)")
    return numel


def unpack_mask(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`pack_mask`: uint8 ``packed`` (ceil(prod(shape) / 8),) -> bool ``shape``.

    >>> unpack_mask(torch.tensor([176, 128], dtype=torch.uint8), (3, 3)).int().tolist()
    [[1, 0, 1], [1, 0, 0], [0, 0, 1]]
    """
    shape = tuple(int(d) for d in shape)
    numel = check_packed(packed, shape)
    shifts = _BIT_SHIFTS.to(packed.device)  # (8,)
    bits = (packed.reshape(-1, 1) >> shifts) & 1  # (n_bytes, 8)
    return bits.reshape(-1)[:numel].to(torch.bool).reshape(shape)  # shape


@dataclass(frozen=True)
class PackedMask:
    """A bool keep-mask held bit-packed (1 bit per weight, as ``masks.safetensors`` stores it).

    >>> m = PackedMask.of(torch.tensor([[True, False, True]]))
    >>> m.shape, m.unpack().tolist()
    ((1, 3), [[True, False, True]])
    """

    packed: torch.Tensor                 # (ceil(numel / 8),) uint8, on the host
    shape: tuple[int, ...]

    @classmethod
    def of(cls, mask: torch.Tensor) -> PackedMask:
        return cls(pack_mask(mask.cpu()), tuple(mask.shape))

    def unpack(self) -> torch.Tensor:
        return unpack_mask(self.packed, self.shape)

    def sparsity(self) -> float:
        """:func:`achieved_sparsity` of the mask, counted on the packed bits (those of the last
        byte's padding left out) without unpacking it: 4 ms for a 4096 x 14336 mask, against 70 ms
        to unpack it.

        >>> PackedMask(torch.tensor([0b10110000, 0b11111111], dtype=torch.uint8), (3, 3)).sparsity()   # 4 of 9 kept
        0.5555555555555556
        """
        numel = math.prod(self.shape)
        if not numel:
            return 0.0
        bits = self.packed.numpy()                                         # (ceil(numel / 8),) uint8
        last = bits[-1] & ((0xFF << (-numel % 8)) & 0xFF)                  # the last byte, padding bits off
        kept = int(np.bitwise_count(bits[:-1]).sum(dtype=np.int64)) + int(np.bitwise_count(last))
        return (numel - kept) / numel


@dataclass(frozen=True)
class KeptValues:
    """A pruned weight held as the values of its kept entries only (the order of ``mask.nonzero()``):
    the share of it that is kept, e.g. half the memory at 50% (pruned entries are +0.0).

    >>> mask = torch.tensor([[True, False], [False, True]])
    >>> kept = KeptValues.of(torch.tensor([[1.5, 0.0], [0.0, -2.0]]), mask)
    >>> kept.values.tolist(), kept.unpack(mask).tolist()
    ([1.5, -2.0], [[1.5, 0.0], [0.0, -2.0]])
    """

    values: torch.Tensor | StoredTensor  # (number kept,), the weight's dtype, on the host or in a file

    @classmethod
    def of(cls, weight: torch.Tensor, mask: torch.Tensor) -> KeptValues:
        return cls(weight.detach().cpu()[mask.cpu()])

    def spilled(self) -> KeptValues:
        """The same values moved to a temporary file (:func:`~tamp_fx.runtime.tensor_file.spill`;
        OSError when it cannot be written), read back when unpacked."""
        return KeptValues(spill(self.values))

    def unpack(self, mask: torch.Tensor) -> torch.Tensor:
        """The weight (mask's shape), +0.0 where ``mask`` is False."""
        values = self.values.read() if isinstance(self.values, StoredTensor) else self.values   # (number kept,)
        # masked_scatter_ fills in mask order, without the int64 indices (16 bytes a kept entry) dense[mask] = ... builds
        return values.new_zeros(mask.shape).masked_scatter_(mask, values)


class _HeldCompact(MutableMapping):
    """Tensors by name, each held in a compact form (:meth:`_hold`) and given back whole when read
    (:meth:`_unpack`); the base of :class:`PackedMasks` and :class:`KeptWeights`."""

    def __init__(self, values: Mapping[str, Any] | None = None) -> None:
        self._held: dict[str, Any] = {}
        for name, value in (values or {}).items():
            self[name] = value

    def _hold(self, value: Any) -> Any:
        raise NotImplementedError

    def _unpack(self, held: Any) -> torch.Tensor:
        raise NotImplementedError

    def __setitem__(self, name: str, value: Any) -> None:
        self._held[name] = self._hold(value)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._unpack(self._held[name])

    def __delitem__(self, name: str) -> None:
        del self._held[name]

    def __contains__(self, name: object) -> bool:
        return name in self._held            # Mapping's own would unpack the value to answer

    def __iter__(self):
        return iter(self._held)

    def __len__(self) -> int:
        return len(self._held)


class PackedMasks(_HeldCompact):
    """Keep-masks by name, held bit-packed: a plan of an 8B model holds 0.9 GB of masks, not the
    7 GB of bool tensors. Setting takes a bool tensor or a :class:`PackedMask`; getting unpacks.

    >>> masks = PackedMasks({"w": torch.tensor([True, False])})
    >>> masks["w"].tolist(), masks.packed("w").shape
    ([True, False], (2,))
    """

    def _hold(self, mask: torch.Tensor | PackedMask) -> PackedMask:
        return mask if isinstance(mask, PackedMask) else PackedMask.of(mask)

    def _unpack(self, held: PackedMask) -> torch.Tensor:
        return held.unpack()

    def packed(self, name: str) -> PackedMask:
        return self._held[name]


class KeptWeights(_HeldCompact):
    """Reconstructed weights by name (SparseGPT's, already masked), each held compact until it is
    read: as the values of its kept entries (:class:`KeptValues` with its :class:`PackedMask`; a
    plan of SmolLM2 holds 106 MB of them, not 212 MB of dense bfloat16 weights), or, in a plan read
    from disk, as a :class:`~tamp_fx.runtime.tensor_file.StoredTensor` not yet read. Setting takes
    one of those or a dense tensor (held as it is); getting returns the dense weight.

    >>> mask = torch.tensor([True, False])
    >>> weights = KeptWeights({"w": (KeptValues.of(torch.tensor([3.0, 0.0]), mask), PackedMask.of(mask))})
    >>> weights["w"].tolist(), weights.layout("w")
    ([3.0, 0.0], (torch.float32, (2,)))
    """

    def _hold(self, weight: torch.Tensor | StoredTensor | tuple[KeptValues, PackedMask]) -> Any:
        return weight

    def _unpack(self, held: torch.Tensor | StoredTensor | tuple[KeptValues, PackedMask]) -> torch.Tensor:
        if isinstance(held, torch.Tensor):
            return held
        if isinstance(held, StoredTensor):
            return held.read()
        kept, mask = held
        return kept.unpack(mask.unpack())

    def dense(self, name: str, mask: torch.Tensor) -> torch.Tensor:
        """Weight ``name`` whole, given its keep-mask already unpacked (``mask``): kept values are
        scattered by it instead of by a second unpacking of the mask held with them."""
        held = self._held[name]
        return held[0].unpack(mask) if isinstance(held, tuple) else self._unpack(held)

    def held(self, name: str) -> torch.Tensor | StoredTensor | tuple[KeptValues, PackedMask]:
        """Weight ``name`` in the compact form it is held in, not unpacked or read."""
        return self._held[name]

    def layout(self, name: str) -> Layout:
        """The dtype and shape of weight ``name``, without unpacking or reading it."""
        held = self._held[name]
        if isinstance(held, (torch.Tensor, StoredTensor)):
            return held.dtype, tuple(held.shape)
        kept, mask = held
        return kept.values.dtype, mask.shape


def apply_mask(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A new tensor like ``weight`` with pruned (``False``) entries set to +0.0; ``weight`` is
    never modified, kept entries are bit-identical, and dtype/device are preserved.

    >>> apply_mask(torch.tensor([[1.0, -2.0]]), torch.tensor([[True, False]])).tolist()
    [[1.0, 0.0]]
    """
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be bool, got dtype {mask.dtype}")
    if weight.shape != mask.shape:
        raise ValueError(
            f"mask shape {tuple(mask.shape)} does not match weight shape {tuple(weight.shape)}"
        )
    # masked_fill writes +0.0 (multiplying by 0 would turn negative weights into -0.0).
    return weight.masked_fill(~mask.to(weight.device), 0)  # same shape as weight
