"""Where and in what precision a plan is computed: run options, never part of a plan's identity.

``device``: ``cpu``, ``cuda`` or ``cuda:N`` (None: ``cuda`` when CUDA is available, else ``cpu``).
``dtype`` of the forward passes: ``auto`` (the checkpoint's), ``float32``, ``bfloat16`` or
``float16``. None: for planning (``native_default=True``) ``bfloat16`` where the device computes it
natively (:func:`computes_bf16_natively`: CUDA with bf16, CPUs with AVX512-BF16 or AMX), else
``float32`` on the CPU and ``auto`` on CUDA; the environment variable ``TAMP_FX_DTYPE`` sets
another default (``float32`` keeps plans independent of the CPU's instruction set; the tests use
it). Evaluation's default is ``float32`` on the CPU and ``auto`` on CUDA. Statistics stay float32 /
float64 whatever the compute dtype (observers, Hessians and Gram matrices upcast their inputs).

>>> resolve_device("cpu"), resolve_dtype("bfloat16", torch.device("cpu"), torch.float32)
(device(type='cpu'), torch.bfloat16)
>>> resolve_dtype(None, torch.device("cpu"), torch.bfloat16)
torch.float32
"""
from __future__ import annotations

import contextlib
import logging
import os

import torch

from tamp_fx.errors import TampError

log = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype | None] = {
    "auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The torch device for ``device``, or a one-line error when it is not usable here."""
    if device is None:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise TampError(f"unknown device {device!r}: use cpu, cuda or cuda:N") from error
    if d.type == "cpu":
        return torch.device("cpu")
    if d.type != "cuda":
        raise TampError(f"device {device!r} is not supported: use cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise TampError(f"--device {device}: CUDA is not available here (torch {torch.__version__}, "
                        f"{torch.cuda.device_count()} GPU(s)): use --device cpu")
    index = torch.cuda.current_device() if d.index is None else d.index
    if index >= torch.cuda.device_count():
        raise TampError(f"--device {device}: there are only {torch.cuda.device_count()} CUDA device(s) "
                        f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    return torch.device("cuda", index)


def check_dtype(dtype: str | None) -> None:
    if dtype is not None and dtype not in DTYPES:
        raise TampError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")


#: the environment variable that sets the default compute dtype of planning
DTYPE_VARIABLE = "TAMP_FX_DTYPE"


def computes_bf16_natively(device: torch.device) -> bool:
    """Whether ``device`` multiplies bfloat16 in hardware: CUDA with bf16 support, a CPU with
    AVX512-BF16 or AMX (oneDNN's bf16 kernels; plain AVX-512 only converts)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    return False


def resolve_dtype(dtype: str | None, device: torch.device, checkpoint_dtype: torch.dtype, *,
                  native_default: bool = False) -> torch.dtype:
    """The compute dtype: ``dtype`` by name, ``auto`` = ``checkpoint_dtype``; None: see the module
    (``native_default``: planning's default, bfloat16 where the device computes it natively)."""
    check_dtype(dtype)
    if dtype is None and native_default:
        dtype = os.environ.get(DTYPE_VARIABLE) or None
        if dtype is not None and dtype not in DTYPES:
            raise TampError(f"{DTYPE_VARIABLE}={dtype!r} is not a dtype: use one of {', '.join(DTYPES)} or unset it")
        if dtype is None and computes_bf16_natively(device):
            dtype = "bfloat16"
    if dtype is None:
        dtype = "float32" if device.type == "cpu" else "auto"
    resolved = DTYPES[dtype] or checkpoint_dtype
    if device.type == "cpu" and not cpu_multiplies_natively(resolved):
        log.warning("computing in %s on a CPU that has no native %s matrix products (%s): they are emulated, "
                    "several times slower than in float32; --dtype float32 is faster here",
                    _name(resolved), _name(resolved), torch.backends.cpu.get_cpu_capability())
    return resolved


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def cpu_multiplies_natively(dtype: torch.dtype) -> bool:
    """Whether this CPU multiplies ``dtype`` matrices natively (for bfloat16 and float16: the
    AVX-512 or AMX instructions oneDNN needs). Without them (an AVX2-only CPU) half-precision
    matrix products are emulated, and slower than float32 ones (docs/results.md measures both on an AVX-512 CPU)."""
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if dtype == torch.float16:
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    return True


def cpu_autocast():
    """bfloat16 autocast on a CPU that multiplies bfloat16 natively, else nothing (float32):
    the fixtures' training and validation use it, so an AVX2-only machine is not slowed down."""
    native = cpu_multiplies_natively(torch.bfloat16)
    return torch.autocast("cpu", dtype=torch.bfloat16) if native else contextlib.nullcontext()
