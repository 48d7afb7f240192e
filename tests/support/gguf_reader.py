"""A GGUF header as gguf's own ``GGUFReader`` reads it: the reference for :mod:`tamp_fx.load.gguf_header`."""
from __future__ import annotations

from pathlib import Path

from tamp_fx.load.gguf_header import GGUFHeader


def as_gguf_reads_it(path: Path) -> GGUFHeader:
    """The header of the GGUF file ``path`` as GGUFReader gives it (metadata arrays as None)."""
    from gguf import GGUFReader, GGUFValueType
    reader = GGUFReader(path)
    metadata = {k: None if f.types[0] == GGUFValueType.ARRAY else f.contents()
                for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    return GGUFHeader(metadata, {t.name: tuple(int(d) for d in reversed(t.shape.tolist())) for t in reader.tensors})
