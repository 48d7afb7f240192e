"""safetensors files a tensor at a time: :func:`save_tensors` writes the header from each
tensor's dtype and shape, then each tensor's bytes as it is produced, so a file of many large
tensors (a SparseGPT plan's weights, a shard of a pruned checkpoint) never needs them all in
memory at once, as ``safetensors.torch.save_file`` does; its bytes are the ones ``save_file``
writes for the same tensors and metadata. :class:`StoredTensor` is the other direction: one
tensor of an open file, read when asked for; :func:`spill` moves a tensor out of memory into
a temporary file that nothing outlives.

>>> import tempfile, os
>>> path = os.path.join(tempfile.mkdtemp(), "t.safetensors")
>>> save_tensors(path, {"w": (torch.float32, (2,))}, lambda name: torch.tensor([1.0, 2.0]))
>>> StoredTensor.open_all(path)["w"].read().tolist()
[1.0, 2.0]
"""

from __future__ import annotations

import json
import math
import os
import struct
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

#: safetensors' dtype names (:data:`DTYPES` the other way round), in the order ``save_file`` lays
#: tensors out: by this order first, then by name
_NAMES = {torch.uint64: "U64", torch.int64: "I64", torch.float64: "F64", torch.complex64: "C64",
          torch.float32: "F32", torch.uint32: "U32", torch.int32: "I32", torch.bfloat16: "BF16",
          torch.float16: "F16", torch.uint16: "U16", torch.int16: "I16", torch.float8_e5m2fnuz: "F8_E5M2FNUZ",
          torch.float8_e4m3fnuz: "F8_E4M3FNUZ", torch.float8_e4m3fn: "F8_E4M3",
          torch.float8_e5m2: "F8_E5M2", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}
_RANK = {dtype: rank for rank, dtype in enumerate(_NAMES)}
DTYPES = {name: dtype for dtype, name in _NAMES.items()}

#: a tensor's place in a file before it is produced: its dtype and shape
Layout = tuple[torch.dtype, tuple[int, ...]]


def save_tensors(path: str | Path, layout: Mapping[str, Layout], produce: Callable[[str], torch.Tensor],
                 metadata: Mapping[str, str] | None = None) -> None:
    """Write the tensors ``layout`` names (name -> (dtype, shape)) to the safetensors file ``path``,
    each made by ``produce(name)`` when its turn comes and let go after it is written. A produced
    tensor must match its layout (ValueError otherwise: the file is then incomplete, so write it
    to a temporary path, as every output here is)."""
    order = sorted(layout, key=lambda name: (_RANK[layout[name][0]], name))
    header: dict[str, Any] = {} if metadata is None else {"__metadata__": dict(metadata)}
    start = 0
    for name in order:
        dtype, shape = layout[name]
        end = start + math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": [start, end]}
        start = end
    head = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    head += b" " * (-len(head) % 8)                       # the data starts 8-byte aligned, as save_file pads it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head)
        for name in order:
            tensor = produce(name)
            if (tensor.dtype, tuple(tensor.shape)) != (layout[name][0], tuple(layout[name][1])):
                raise ValueError(f"{name} was laid out as {layout[name][0]} {tuple(layout[name][1])} but produced as "
                                 f"{tensor.dtype} {tuple(tensor.shape)}")
            f.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)   # (bytes,)
            del tensor                                     # let go before the next is made


@dataclass(frozen=True, eq=False)
class StoredTensor:
    """One tensor of a safetensors file held open (its pages mapped, nothing read): ``dtype`` and
    ``shape`` from the header, the values when :meth:`read`. The open file stays the one it was
    when opened, even if its path is later replaced."""

    file: Any                            # the safe_open handle, shared by the file's tensors
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @classmethod
    def open_all(cls, path: str | Path) -> dict[str, StoredTensor]:
        """Every tensor of ``path`` by name (SafetensorError or OSError if it is not a readable file;
        KeyError for a dtype this module does not name)."""
        file = safe_open(str(path), "pt")
        stored = {}
        for name in file.keys():
            part = file.get_slice(name)
            stored[name] = cls(file, name, DTYPES[part.get_dtype()], tuple(part.get_shape()))
        return stored

    def read(self) -> torch.Tensor:
        return self.file.get_tensor(self.name)


def spill(tensor: torch.Tensor, directory: str | Path | None = None) -> StoredTensor:
    """``tensor`` moved out of memory: written to a temporary file in ``directory`` (None: the
    system's temporary directory, ``TMPDIR``), opened, and unlinked at once, so its disk space is
    freed when the last :class:`StoredTensor` of it is let go and nothing is left behind even if
    the process is killed. Raises OSError (a full disk, no such directory) with nothing left.

    >>> spill(torch.tensor([1.5, -2.0])).read().tolist()
    [1.5, -2.0]
    """
    fd, path = tempfile.mkstemp(prefix=".tamp-fx-spill-", suffix=".safetensors", dir=directory)
    os.close(fd)
    try:
        save_tensors(path, {"t": (tensor.dtype, tuple(tensor.shape))}, lambda name: tensor)
        return StoredTensor.open_all(path)["t"]
    finally:
        os.unlink(path)
