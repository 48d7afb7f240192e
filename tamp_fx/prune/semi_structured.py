"""Semi-structured (2:4) sparse weights: at most 2 kept entries in every 4 consecutive input columns.

NVIDIA GPUs of compute capability 8.0+ (A100, H100, ...) multiply such weights with sparse tensor
cores through ``torch.sparse.to_sparse_semi_structured`` (fp16 / bf16, CUDA only). This module has
the CPU side (the 2:4 check, a reference of the compressed layout, the kernels' shape limits) and
the CUDA side (convert a weight, sparsify a model, load a directory written by
``tamp-fx apply --format semi-structured``).

The compressed layout here is a readable reference, not the kernels' own (cuSPARSELt and CUTLASS
interleave their metadata): ``values`` (C_out, C_in / 2) holds the two entries kept from each
group of 4, ``positions`` (C_out, C_in / 4, 2) their ascending positions 0..3 in the group.
"""
from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from tamp_fx.errors import TampError
from tamp_fx.registry import Registry

#: Values of ``tamp_fx.apply(..., format=...)`` and ``tamp-fx apply --format``.


@dataclass(frozen=True)
class Format:
    """How ``apply`` stores pruned weights."""

    name: str
    dtype: torch.dtype | None            # what the weights are written in (None: as the input)


FORMATS: Registry[Format] = Registry("format")
FORMATS.register(Format("dense", None))                           # masked weights, as the input stores them
FORMATS.register(Format("semi-structured", torch.bfloat16))       # 2:4 linears listed for the CUDA 2:4 kernels
#: The file ``apply --format semi-structured`` writes beside the checkpoint, read by :func:`load`.
MANIFEST = "semi_structured.json"
MANIFEST_VERSION = 1
#: Weight dtypes the 2:4 kernels take here.
DTYPES = (torch.float16, torch.bfloat16)
#: Smallest (rows, columns) of a 2:4 weight per backend and dtype; both dimensions must also be
#: multiples of these. From ``_DTYPE_SHAPE_CONSTRAINTS`` (sparse_min_rows, sparse_min_cols) of
#: torch/sparse/semi_structured.py: torch uses cuSPARSELt unless it is told to force CUTLASS.
MIN_SHAPE = {
    "cusparselt": {torch.float16: (16, 16), torch.bfloat16: (16, 16)},
    "cutlass": {torch.float16: (32, 64), torch.bfloat16: (32, 64)},
}


def is_2_4(mask: torch.Tensor) -> bool:
    """Whether every group of 4 consecutive entries along the input dim keeps at most 2.

    ``mask`` (C_out, C_in) is a bool keep-mask, or a weight whose nonzero entries are the kept ones.
    A C_in that is not a multiple of 4 is not 2:4.

    >>> is_2_4(torch.tensor([[1.0, 0.0, 0.0, 2.0], [0.0, 0.0, 0.0, 3.0]]))
    True
    >>> is_2_4(torch.tensor([[True, True, True, False]]))
    False
    """
    if mask.dim() != 2 or mask.shape[1] % 4:
        return False
    kept = mask if mask.dtype == torch.bool else mask != 0                    # (C_out, C_in)
    per_group = kept.reshape(kept.shape[0], -1, 4).sum(dim=-1)               # (C_out, C_in / 4)
    return bool((per_group <= 2).all())


def _check_2d(weight: torch.Tensor) -> tuple[int, int]:
    if weight.dim() != 2:
        raise ValueError(f"a 2:4 weight must be 2-D (C_out, C_in), got shape {tuple(weight.shape)}")
    c_out, c_in = weight.shape
    if c_in % 4:
        raise ValueError(f"a 2:4 weight needs C_in a multiple of 4, got shape {tuple(weight.shape)}")
    return c_out, c_in


def compress_2_4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CPU reference of the 2:4 packing: ``(values (C_out, C_in / 2), positions (C_out, C_in / 4, 2) uint8)``.

    Each group of 4 keeps its nonzero entries (at most 2), padded with the lowest-index zero
    entries when it has fewer than 2; positions ascend within a group.

    >>> values, positions = compress_2_4(torch.tensor([[0.0, 5.0, 0.0, 7.0, 0.0, 0.0, 0.0, 9.0]]))
    >>> values.tolist(), positions.tolist()
    ([[5.0, 7.0, 0.0, 9.0]], [[[1, 3], [0, 3]]])
    """
    c_out, c_in = _check_2d(weight)
    if not is_2_4(weight):
        raise ValueError("weight is not 2:4: some group of 4 input columns has more than 2 nonzero entries")
    groups = weight.reshape(c_out, c_in // 4, 4)                             # (C_out, C_in / 4, 4)
    index = torch.arange(4, device=weight.device)                            # (4,)
    # nonzero entries first, then zeros, each by position; the first two are kept
    rank = (groups == 0).to(torch.int64) * 4 + index                         # (C_out, C_in / 4, 4)
    positions = rank.argsort(dim=-1)[..., :2].sort(dim=-1).values            # (C_out, C_in / 4, 2)
    values = groups.gather(-1, positions)                                    # (C_out, C_in / 4, 2)
    return values.reshape(c_out, c_in // 2), positions.to(torch.uint8)


def decompress_2_4(values: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`compress_2_4`: the dense weight (C_out, C_in) from ``values``
    (C_out, C_in / 2) and ``positions`` (C_out, C_in / 4, 2). A -0.0 that was not kept comes
    back as +0.0 (equal as numbers).

    >>> decompress_2_4(torch.tensor([[5.0, 7.0]]), torch.tensor([[[1, 3]]], dtype=torch.uint8)).tolist()
    [[0.0, 5.0, 0.0, 7.0]]
    """
    if values.dim() != 2 or positions.dim() != 3 or positions.shape[-1] != 2:
        raise ValueError(f"values must be (C_out, C_in / 2) and positions (C_out, C_in / 4, 2), got "
                         f"{tuple(values.shape)} and {tuple(positions.shape)}")
    c_out, half = values.shape
    if tuple(positions.shape[:2]) != (c_out, half // 2) or half % 2:
        raise ValueError(f"values {tuple(values.shape)} and positions {tuple(positions.shape)} do not match: "
                         "values must be (C_out, C_in / 2) and positions (C_out, C_in / 4, 2)")
    if positions.numel() and int(positions.max()) > 3:
        raise ValueError(f"positions must lie in 0..3, got {int(positions.max())}")
    dense = values.new_zeros(c_out, half // 2, 4)                            # (C_out, C_in / 4, 4)
    dense.scatter_(-1, positions.to(torch.int64), values.reshape(c_out, half // 2, 2))
    return dense.reshape(c_out, half * 2)                                    # (C_out, C_in)


def check_shape(shape: tuple[int, ...], dtype: torch.dtype = torch.bfloat16, backend: str | None = None) -> None:
    """Raise ValueError naming the limit that a weight of ``shape`` (C_out, C_in) breaks for the
    2:4 kernels of ``backend`` ("cusparselt" or "cutlass"; None: both, so it runs on either).

    >>> check_shape((4096, 11008))
    >>> check_shape((4096, 100), backend="cusparselt")
    Traceback (most recent call last):
    ...
    ValueError: 2:4 weights of dtype torch.bfloat16 need C_in a multiple of 16 (cusparselt), got shape (4096, 100)
    """
    if dtype not in DTYPES:
        raise ValueError(f"2:4 weights here are float16 or bfloat16, got {dtype}")
    if backend is not None and backend not in MIN_SHAPE:
        raise ValueError(f"unknown 2:4 backend {backend!r}; valid backends are {', '.join(MIN_SHAPE)}")
    if len(shape) != 2:
        raise ValueError(f"a 2:4 weight must be 2-D (C_out, C_in), got shape {tuple(shape)}")
    for name in [backend] if backend else list(MIN_SHAPE):
        min_rows, min_cols = MIN_SHAPE[name][dtype]
        for dim, size, minimum in (("C_out", shape[0], min_rows), ("C_in", shape[1], min_cols)):
            if size < minimum or size % minimum:
                raise ValueError(f"2:4 weights of dtype {dtype} need {dim} a multiple of {minimum} ({name}), "
                                 f"got shape {tuple(shape)}")


def cuda_problem() -> str | None:
    """Why this machine cannot run the 2:4 kernels (no CUDA, or compute capability below 8.0); None if it can."""
    if not torch.cuda.is_available():
        return "this machine has no CUDA"
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        return f"{torch.cuda.get_device_name()} has compute capability {major}.{minor}"
    return None


def require_cuda() -> None:
    """Raise a one-line TampError unless a CUDA GPU of compute capability 8.0+ is at hand."""
    problem = cuda_problem()
    if problem:
        raise TampError(f"semi-structured 2:4 weights run only on a CUDA GPU with compute capability 8.0+ ({problem}): "
                        "use --format dense, or load the checkpoint on a GPU machine")


def to_semi_structured(weight: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``weight`` (C_out, C_in), already 2:4, as a CUDA ``SparseSemiStructuredTensor`` of ``dtype``
    (default: the weight's own if float16 / bfloat16, else bfloat16). ``weight`` is not modified."""
    require_cuda()
    dtype = dtype or (weight.dtype if weight.dtype in DTYPES else torch.bfloat16)
    check_shape(tuple(weight.shape), dtype)
    dense = weight.detach().to("cuda", dtype).contiguous()                   # (C_out, C_in)
    if not is_2_4(dense):
        raise ValueError("weight is not 2:4: some group of 4 input columns has more than 2 nonzero entries")
    return torch.sparse.to_sparse_semi_structured(dense)


def sparsify(model: torch.nn.Module, module_names: Iterable[str], dtype: torch.dtype | None = None) -> torch.nn.Module:
    """Replace the weight of each named ``nn.Linear`` of ``model`` (in place) with a semi-structured
    parameter on CUDA; the rest of the model must be moved to CUDA by the caller. Returns ``model``."""
    require_cuda()
    for name in module_names:
        try:
            module = model.get_submodule(name)
        except AttributeError as error:
            raise TampError(f"the model has no module {name} to make 2:4: the checkpoint and its {MANIFEST} "
                            "do not match") from error
        if not isinstance(module, torch.nn.Linear):
            raise TampError(f"{name} is a {type(module).__name__}, not a Linear: only linear weights can be 2:4")
        try:
            sparse = to_semi_structured(module.weight, dtype)
        except ValueError as error:
            raise TampError(f"{name} cannot use the 2:4 kernels: {error}") from error
        module.weight = torch.nn.Parameter(sparse, requires_grad=False)
    return model


def write_manifest(directory: Path, module_names: Iterable[str], dtype: torch.dtype) -> Path:
    """Record which linears of the checkpoint in ``directory`` :func:`load` makes 2:4."""
    path = Path(directory) / MANIFEST
    data = {"format": "semi-structured", "format_version": MANIFEST_VERSION, "dtype": str(dtype).removeprefix("torch."),
            "modules": sorted(module_names)}
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path


def read_manifest(directory: Path) -> list[str]:
    """The module names recorded by :func:`write_manifest`; a one-line TampError when absent or unreadable."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise TampError(f"{directory} has no {MANIFEST}: write it with `tamp-fx apply --format semi-structured`")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise TampError(f"{path} is not valid JSON ({error}): re-run `tamp-fx apply --format semi-structured`") from error
    if not isinstance(data, dict) or data.get("format_version") != MANIFEST_VERSION:
        raise TampError(f"{path} has format_version {data.get('format_version') if isinstance(data, dict) else None!r}, "
                        f"this tamp-fx reads {MANIFEST_VERSION}: re-run `tamp-fx apply --format semi-structured`")
    modules = data.get("modules")
    if not isinstance(modules, list) or not all(isinstance(m, str) for m in modules):
        raise TampError(f"{path} lists no module names under \"modules\": re-run `tamp-fx apply --format semi-structured`")
    return modules


def load(directory: str | Path, dtype: torch.dtype = torch.bfloat16) -> torch.nn.Module:
    """Load a directory written by ``tamp-fx apply --format semi-structured`` on CUDA with its
    pruned linears as 2:4 semi-structured weights (``from_pretrained`` alone loads it dense)."""
    from tamp_fx.load.source import load_model, resolve_source  # transformers only when loading

    if dtype not in DTYPES:
        raise TampError(f"semi-structured models load as float16 or bfloat16, got {dtype}")
    require_cuda()
    names = read_manifest(Path(directory))
    model = load_model(resolve_source(directory), dtype=dtype).to("cuda")
    return sparsify(model, names, dtype)


__all__ = ["FORMATS", "MANIFEST", "is_2_4", "compress_2_4", "decompress_2_4", "check_shape", "cuda_problem",
           "require_cuda", "to_semi_structured", "sparsify", "load"]
