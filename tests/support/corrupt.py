"""Damaged inputs a careless or hostile user could pass, for the robustness tests: files cut
short or lying about their size, and hypothesis strategies that damage JSON documents (a plan's
``plan.json``, calibration records) and safetensors files."""
from __future__ import annotations

import json
import struct
import wave
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from hypothesis import strategies as st


def small_gguf(path: Path) -> Path:
    """A complete GGUF file of a llama with small sizes (so a model built from it is small),
    its header (magic, version, counts, metadata) and one tensor."""
    import gguf
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    writer.add_context_length(64)
    writer.add_embedding_length(32)
    writer.add_feed_forward_length(64)
    writer.add_head_count(2)
    writer.add_head_count_kv(2)
    writer.add_tensor("token_embd.weight", np.zeros((8, 32), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def gguf_cut_in_header(path: Path, keep: int = 40) -> Path:
    """:func:`small_gguf` cut after ``keep`` bytes, inside its header: reading it raises
    ``struct.error`` deep in the GGUF reader."""
    full = small_gguf(path.with_name(path.name + ".full"))
    path.write_bytes(full.read_bytes()[:keep])
    full.unlink()
    return path


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def decompression_bomb_png(path: Path, side: int = 40_000) -> Path:
    """A valid-looking PNG of a few bytes whose header claims ``side`` x ``side`` pixels: PIL
    refuses it (DecompressionBombError) rather than allocate gigabytes."""
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)              # 8-bit RGB
    pixels = zlib.compress(b"\x00" * 16)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", pixels)
                     + _png_chunk(b"IEND", b""))
    return path


def wav(path: Path, *, bits: int = 16, seconds: float = 0.25, rate: int = 16_000, cut: int = 0) -> Path:
    """A mono PCM tone of ``bits`` bits (8, 16, 24 or 32); ``cut`` bytes removed from its end
    (the header still promises every frame)."""
    width = bits // 8
    t = np.arange(int(rate * seconds)) / rate
    tone = 0.5 * np.sin(2 * np.pi * 440 * t)                                  # (T,)
    if width == 1:
        data = (tone * 127 + 128).astype(np.uint8).tobytes()
    else:
        ints = (tone * (2 ** (bits - 1) - 1)).astype("<i4")                     # (T,)
        data = ints.view(np.uint8).reshape(-1, 4)[:, :width].tobytes()         # the low ``width`` bytes, little-endian
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(data)
    if cut:
        path.write_bytes(path.read_bytes()[:-cut])
    return path


def deeply_nested_json(depth: int = 100_000) -> str:
    """A JSON document nested ``depth`` lists deep (json.loads raises RecursionError)."""
    return "[" * depth + "]" * depth


#: Any JSON value, NaN and infinities included (Python's json reads and writes them).
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6)


@st.composite
def damaged(draw, document: Any) -> Any:
    """``document`` (JSON-like) with one thing broken somewhere in it: a value replaced by
    any JSON value, a key removed, or an unknown key added. Deeper places are as likely as
    shallow ones: at every container the draw goes on down with probability 3/4."""
    if isinstance(document, (dict, list)) and document and draw(st.integers(0, 3)) > 0:
        key = draw(st.sampled_from(sorted(document) if isinstance(document, dict) else range(len(document))))
        copy = dict(document) if isinstance(document, dict) else list(document)
        copy[key] = draw(damaged(document[key]))
        return copy
    how = draw(st.sampled_from(["replace", "remove", "add"] if isinstance(document, dict) and document else ["replace"]))
    if how == "replace":
        return draw(json_values)
    copy = dict(document)
    if how == "remove":
        del copy[draw(st.sampled_from(sorted(copy)))]
    else:
        copy[draw(st.text(min_size=1, max_size=8))] = draw(json_values)
    return copy


@st.composite
def damaged_bytes(draw, data: bytes) -> bytes:
    """``data`` cut short, with a stretch overwritten by random bytes, or with bytes inserted."""
    how = draw(st.sampled_from(["cut", "overwrite", "insert"]))
    at = draw(st.integers(0, len(data) - 1))
    if how == "cut":
        return data[:at]
    noise = draw(st.binary(min_size=1, max_size=16))
    return data[:at] + noise + data[at + (len(noise) if how == "overwrite" else 0):]


def write_json(path: Path, document: Any) -> Path:
    path.write_text(json.dumps(document))
    return path
