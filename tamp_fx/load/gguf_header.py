"""A GGUF file's header, parsed for what the checks need: a few metadata values and the tensor table.

gguf's own ``GGUFReader`` builds a numpy view of every metadata item, the tokenizer's included:
2.3 s for SmolLM2's 49,152-token vocabulary, against 0.08 s here, where arrays are
stepped over and only scalars and strings are kept. The layout (GGUF versions 2 and 3, either byte
order): magic ``GGUF``, version (uint32), tensor and metadata counts (uint64); each metadata item a
key (uint64 length + UTF-8), a type (uint32) and a value (an array: item type, uint64 count,
items); then per tensor a name, the number of dimensions (uint32), the dimensions (uint64 each,
innermost first), the tensor type (uint32) and its data offset (uint64).

A damaged header raises ValueError (a count or length past the end of the file, an unknown type),
never reads past the file or allocates by a count it holds.
"""
from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
_MAX_DIMS = 4                   # GGML_MAX_DIMS
_MAX_NESTING = 8                # arrays of arrays: deeper is damage


@dataclass(frozen=True)
class GGUFHeader:
    metadata: dict[str, object]                 # key -> scalar or string (arrays: None)
    shapes: dict[str, tuple[int, ...]]          # tensor name -> shape in torch order (outermost first)


class _Cursor:
    def __init__(self, data: mmap.mmap | bytes, order: str) -> None:
        self.data, self.order, self.at = data, order, 0

    def take(self, code: str) -> object:
        fmt = self.order + code
        end = self.at + struct.calcsize(fmt)
        if end > len(self.data):
            raise ValueError(f"the header ends inside a value at byte {self.at}")
        (value,) = struct.unpack_from(fmt, self.data, self.at)
        self.at = end
        return value

    def room(self, count: int, size: int) -> None:
        """ValueError unless ``count`` items of at least ``size`` bytes fit in the rest of the file."""
        if count * size > len(self.data) - self.at:
            raise ValueError(f"a count of {count} at byte {self.at} runs past the end of the file")

    def skip(self, count: int, size: int) -> None:
        self.room(count, size)
        self.at += count * size

    def string(self) -> str:
        length = self.take("Q")
        start = self.at
        self.skip(length, 1)
        return bytes(self.data[start:self.at]).decode("utf-8")

    def value(self, kind: object, depth: int = 0) -> object:
        """A metadata value of type ``kind``; an array is stepped over (None)."""
        if kind in _SCALARS:
            return self.take(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item, count = self.take("I"), self.take("Q")
            if item in _SCALARS:
                self.skip(count, struct.calcsize(_SCALARS[item]))
            elif item in (_STRING, _ARRAY) and depth < _MAX_NESTING:
                self.room(count, 8)                       # each holds at least a uint64 (a length or count)
                for _ in range(count):
                    self.value(item, depth + 1)
            else:
                raise ValueError(f"array item type {item} at byte {self.at} is unknown or nested too deep")
            return None
        raise ValueError(f"unknown metadata type {kind} at byte {self.at}")


def read_gguf_header(path: Path) -> GGUFHeader:
    """The metadata scalars and strings and the tensor shapes of the GGUF file ``path`` (no tensor read)."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        if len(data) < 24 or data[:4] != b"GGUF":
            raise ValueError("it does not start with a GGUF header")
        order = next((o for o in "<>" if struct.unpack_from(o + "I", data, 4)[0] in (2, 3)), None)
        if order is None:
            raise ValueError(f"GGUF version {struct.unpack_from('<I', data, 4)[0]} is not 2 or 3")
        cursor = _Cursor(data, order)
        cursor.at = 8
        n_tensors, n_items = cursor.take("Q"), cursor.take("Q")
        metadata = {}
        for _ in range(n_items):                      # each item consumes bytes: a damaged count ends at the file's end
            key = cursor.string()
            metadata[key] = cursor.value(cursor.take("I"))
        shapes = {}
        for _ in range(n_tensors):
            name, ndim = cursor.string(), cursor.take("I")
            if ndim > _MAX_DIMS:
                raise ValueError(f"tensor {name} has {ndim} dimensions, GGUF allows {_MAX_DIMS}")
            dims = [cursor.take("Q") for _ in range(ndim)]
            cursor.take("I"), cursor.take("Q")        # its type and data offset
            shapes[name] = tuple(int(d) for d in reversed(dims))
        return GGUFHeader(metadata, shapes)
