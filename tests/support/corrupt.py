"""Damaged inputs a careless or hostile user could pass, for the robustness tests: files cut
short or lying about their size, and hypothesis strategies that damage JSON documents (a plan's
``plan.json``, calibration records) and safetensors files."""
from __future__ import annotations

import json
import struct
import wave
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from hypothesis import strategies as st

#: the sizes of :func:`small_gguf`'s llama (header key after ``llama.`` -> value); its head_dim is 16
GGUF_SIZES = {"block_count": 2, "context_length": 64, "embedding_length": 32, "feed_forward_length": 48,
              "attention.head_count": 2, "attention.head_count_kv": 1, "rope.dimension_count": 16, "vocab_size": 16}


def small_gguf(path: Path, header: dict[str, int] | None = None) -> Path:
    """A complete GGUF file of a tiny llama (:data:`GGUF_SIZES`, seeded float32 weights, untied
    head) with a tokenizer of 16 tokens: it loads, and a model built from it is small. ``header``:
    sizes written into the header instead (``embedding_length`` -> 64; 2**32 or more as uint64)
    while the tensors keep theirs, as a header damaged upwards would."""
    import gguf
    sizes = {**GGUF_SIZES, **(header or {})}
    writer = gguf.GGUFWriter(str(path), "llama")
    for key, value in sizes.items():
        (writer.add_uint64 if value >= 2 ** 32 else writer.add_uint32)(f"llama.{key}", value)
    writer.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    vocab, width, ffn, heads, kv_heads, head_dim = (GGUF_SIZES[k] for k in (
        "vocab_size", "embedding_length", "feed_forward_length", "attention.head_count", "attention.head_count_kv",
        "rope.dimension_count"))
    writer.add_tokenizer_model("llama")
    writer.add_token_list(["<unk>", "<s>", "</s>", *"abcdefghijklm"])
    writer.add_token_scores([0.0] * 3 + [-float(i) for i in range(vocab - 3)])
    writer.add_token_types([2, 3, 3] + [1] * (vocab - 3))             # unknown, control, normal
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    rng = np.random.default_rng(0)
    shapes = {"token_embd": (vocab, width), "output_norm": (width,), "output": (vocab, width)}
    for i in range(GGUF_SIZES["block_count"]):
        shapes.update({f"blk.{i}.{name}": shape for name, shape in {
            "attn_norm": (width,), "attn_q": (heads * head_dim, width), "attn_k": (kv_heads * head_dim, width),
            "attn_v": (kv_heads * head_dim, width), "attn_output": (width, heads * head_dim), "ffn_norm": (width,),
            "ffn_gate": (ffn, width), "ffn_up": (ffn, width), "ffn_down": (width, ffn)}.items()})
    for name, shape in shapes.items():
        values = np.ones(shape) if len(shape) == 1 else rng.standard_normal(shape) * 0.1    # norms: ones
        writer.add_tensor(f"{name}.weight", values.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def gguf_size_changed(path: Path, key: str, value: int) -> Path:
    """The uint32 size ``llama.KEY`` of the GGUF file at ``path`` set to ``value`` in place (the
    file's length, tensor table and tensors as they were)."""
    raw = bytearray(path.read_bytes())
    name = f"llama.{key}".encode()
    at = raw.index(len(name).to_bytes(8, "little") + name) + 8 + len(name)
    assert raw[at:at + 4] == (4).to_bytes(4, "little"), f"llama.{key} is not a uint32"       # GGUF type 4: uint32
    raw[at + 4:at + 8] = value.to_bytes(4, "little")
    path.write_bytes(bytes(raw))
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


def rewrite_checkpoint(directory: Path, change: Callable[[dict], None]) -> Path:
    """Rewrite every ``*.safetensors`` shard of a model directory with ``change`` applied to its
    tensors (a dict, name -> tensor, changed in place: keys removed or renamed, tensors replaced)."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    for shard in sorted(directory.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
        change(tensors)
        save_file(tensors, shard, metadata=metadata)
    return directory


def flip_bytes(path: Path, *offsets: int) -> Path:
    """``path`` with the byte at each offset inverted (negative offsets count from the end)."""
    data = bytearray(path.read_bytes())
    for at in offsets:
        data[at] ^= 0xFF
    path.write_bytes(bytes(data))
    return path


def _damage(part: str, how: Callable[[dict, str], None]) -> Callable[[dict], str]:
    """A change for :func:`rewrite_checkpoint` of the first tensor whose name holds ``part``; returns that name."""
    def change(tensors: dict) -> str:
        key = next(k for k in sorted(tensors) if part in k)
        how(tensors, key)
        return key
    return change


def _set(value: float, at: tuple[int, ...]) -> Callable[[dict, str], None]:
    def how(tensors: dict, key: str) -> None:
        tensors[key] = tensors[key].clone()
        tensors[key][at] = value
    return how


def _as(dtype_name: str) -> Callable[[dict, str], None]:
    def how(tensors: dict, key: str) -> None:
        import torch
        tensors[key] = tensors[key].to(getattr(torch, dtype_name))
    return how


def _shorter(dim: int) -> Callable[[dict, str], None]:
    def how(tensors: dict, key: str) -> None:
        tensors[key] = tensors[key].narrow(dim, 0, tensors[key].shape[dim] - 1).contiguous()
    return how


def _renamed(tensors: dict, key: str) -> None:
    tensors[key.replace("q_proj", "q_prj")] = tensors.pop(key)


#: ways to damage a model's checkpoint: name -> (change of its tensors, what the refusal says besides the
#: tensor's name). "vision" ones need a model with a vision tower (the tiny llava).
CHECKPOINT_DAMAGE: dict[str, tuple[Callable[[dict], str], str]] = {
    "missing decoder weight": (_damage("layers.1.mlp.up_proj.weight", lambda t, k: t.pop(k)), "has no tensor"),
    "missing embedding": (_damage("embed_tokens.weight", lambda t, k: t.pop(k)), "has no tensor"),
    "missing lm_head": (_damage("lm_head.weight", lambda t, k: t.pop(k)), "has no tensor"),
    "missing vision weight": (_damage("vision_tower.encoder.layers.0.mlp.fc1.weight", lambda t, k: t.pop(k)),
                              "has no tensor"),
    "renamed decoder weight": (_damage("layers.0.self_attn.q_proj.weight", _renamed), "q_prj"),
    "decoder weight of the wrong shape": (_damage("layers.0.mlp.down_proj.weight", _shorter(1)), "has shape"),
    "vision weight of the wrong shape": (_damage("vision_tower.encoder.layers.1.mlp.fc2.weight", _shorter(0)),
                                         "has shape"),
    "fp8 e4m3 decoder weight": (_damage("layers.0.mlp.gate_proj.weight", _as("float8_e4m3fn")), "F8_E4M3"),
    "fp8 e5m2 vision weight": (_damage("vision_tower.encoder.layers.0.self_attn.k_proj.weight",
                                       _as("float8_e5m2")), "F8_E5M2"),
    "int32 decoder weight": (_damage("layers.1.self_attn.v_proj.weight", _as("int32")), "I32"),
    "int64 norm weight": (_damage("norm.weight", _as("int64")), "I64"),
    "bool embedding": (_damage("embed_tokens.weight", _as("bool")), "BOOL"),
    "NaN in a decoder weight": (_damage("layers.1.mlp.down_proj.weight", _set(float("nan"), (3, 5))), "NaN"),
    "inf in the embedding": (_damage("embed_tokens.weight", _set(float("inf"), (7, 1))), "NaN or infinite"),
    "-inf in a vision weight": (_damage("vision_tower.embeddings.patch_embedding.weight",
                                        _set(float("-inf"), (0, 0, 0, 0))), "NaN or infinite"),
}


def damage_checkpoint(directory: Path, how: str) -> str:
    """Damage the model ``directory`` in the :data:`CHECKPOINT_DAMAGE` way ``how``; returns the tensor changed."""
    change, _ = CHECKPOINT_DAMAGE[how]
    names: list[str] = []
    rewrite_checkpoint(directory, lambda tensors: names.append(change(tensors)))
    return names[0]


def config_disagrees(directory: Path, key: str = "hidden_size", factor: float = 0.5) -> Path:
    """The model's config.json with ``key`` (in its text_config, if it has one) scaled by ``factor``."""
    path = directory / "config.json"
    config = json.loads(path.read_text())
    node = config.get("text_config", config)
    node[key] = int(node[key] * factor)
    path.write_text(json.dumps(config))
    return path


def rewrite_member(src: Path, dst: Path, suffix: str, change: Callable[[bytes], bytes]) -> Path:
    """A copy of the zip archive ``src`` (a ``.pt2``) at ``dst``, each member whose name ends with
    ``suffix`` rewritten by ``change`` (the archive's CRCs then match the damaged bytes)."""
    import zipfile
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            zout.writestr(item.filename, change(data) if item.filename.endswith(suffix) else data)
    return dst
