"""A model checked before any work: every tensor the model needs is in the checkpoint, with the
shape its config gives and a dtype tamp-fx computes with (from the safetensors headers alone,
nothing read), and no weight holds NaN or inf (checked as the tensors are read, unless allowed).
A GGUF file's header sizes are checked against its tensor table the same way, before transformers
builds a model of those sizes. Each refusal is one line naming the tensor.

Every way in goes through here: :func:`check_checkpoint` for a Hugging Face directory read layer by
layer (:func:`tamp_fx.load.checkpoint.CheckpointIndex.read` checks values as it reads),
:func:`load_checked` for a model loaded whole (a Hugging Face directory or a GGUF file), and
:func:`check_program` for an exported program, whose archive :func:`tamp_fx.load.program.load_program`
checks (zip CRCs, constants) as it loads it.
"""
from __future__ import annotations

import difflib
import functools
import re
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from tamp_fx.errors import TampError
from tamp_fx.load.checkpoint import (
    FLOATING,
    CheckpointIndex,
    check_finite,
    checkpoint_index,
    meta_model,
    torch_dtype,
)
from tamp_fx.load.gguf_header import read_gguf_header
from tamp_fx.load.source import ModelSource, load_model

_FIX = "re-download or re-save the model"
_GGUF_FIX = "re-download or re-convert the GGUF file"


def check_checkpoint(source: ModelSource, model: torch.nn.Module | None = None,
                     index: CheckpointIndex | None = None) -> CheckpointIndex | None:
    """Refuse a Hugging Face checkpoint that lacks a parameter the model needs (a tied one aside),
    stores one in another shape than the config gives, or stores a floating weight in a dtype
    other than F32, F16, BF16 or F64: from the shards' headers, before anything is read.
    ``model`` (on the meta device) and ``index``: the caller's, when it has them; the index is
    returned. A GGUF file is checked by :func:`check_gguf` (no index: None), and a quantized
    checkpoint's tensors are its quantizer's: :func:`load_checked` checks those once loaded."""
    if source.kind == "gguf":
        check_gguf(source)
    if source.kind != "hf":
        return None
    model = model if model is not None else meta_model(source, torch.float32)
    index = index if index is not None else checkpoint_index(source, model)
    if getattr(model.config, "quantization_config", None) is not None:
        return index                 # laid out by its quantizer (torchao): from_pretrained's own check applies
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    optional = set(getattr(model, "all_tied_weights_keys", None) or {})
    ignored = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_missing", None) or []]
    for name, expected in model.state_dict(keep_vars=True).items():
        if name not in index.entries:
            if name in params and name not in optional and not any(p.search(name) for p in ignored):
                raise TampError(_missing(source, name, index, missing=[n for n in params - optional
                                                                       if n not in index.entries]))
            continue
        key = index.key(name)
        stored, shape = index.stored(name)
        if list(shape) != list(expected.shape):
            raise TampError(f"tensor {key} of {source.path} has shape {list(shape)} where its config.json gives "
                            f"{list(expected.shape)}: the config and the weights disagree; {_FIX}")
        dtype = torch_dtype(stored, key, source.path)
        if expected.is_floating_point() and not dtype.is_floating_point:
            raise TampError(f"tensor {key} of {source.path} is stored as {stored}, but tamp-fx computes with it in "
                            f"floating point: re-save the model with its weights in {', '.join(FLOATING)}")
    return index


def _missing(source: ModelSource, name: str, index: CheckpointIndex, missing: list[str]) -> str:
    """The refusal of a missing tensor, naming a checkpoint tensor of a near name that the model does not load."""
    count = f" ({len(missing)} missing)" if len(missing) > 1 else ""
    near = difflib.get_close_matches(name, list(index.unmatched), n=1, cutoff=0.8)
    hint = f"; it holds {index.unmatched[near[0]]}, which this model does not load: rename it" if near else ""
    key = index.key(name)
    loaded = f" (loaded as {name})" if key != name else ""
    return f"model {source.path} has no tensor {key}{loaded}{count}, which the model needs{hint}: {_FIX}"


def check_gguf_header(source: ModelSource) -> None:
    """Refuse a GGUF file whose header gives another number of layers than it holds blocks of
    tensors (``blk.N.*``): before any config is built from it, as a config may hold a list of one
    entry per layer (:func:`tamp_fx.load.source.load_config` calls this)."""
    arch, layers, shapes = _gguf_header(source.path)
    blocks = len({name.split(".")[1] for name in shapes if name.startswith("blk.")})
    if isinstance(layers, int) and layers != blocks:
        raise TampError(f"GGUF file {source.path} gives {layers} layers ({arch}.block_count) but holds the tensors "
                        f"of {blocks}: the header and the tensors disagree; {_GGUF_FIX}")


def check_gguf(source: ModelSource) -> None:
    """Refuse a GGUF file whose header describes another model than its tensors hold: every
    parameter of the model its header describes (built on the meta device) must be a tensor of the
    file (named as gguf names it) of the same shape. From the header's tensor table alone, nothing
    read: a size damaged upwards (width, feed-forward, heads, vocabulary) is refused before
    transformers builds a model of that size. A file is checked once per version (size, mtime)."""
    stat = source.path.stat()
    _check_gguf(source, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4)                     # what it accepts: a refusal raises, and is not kept
def _check_gguf(source: ModelSource, size: int, mtime_ns: int) -> None:
    import gguf
    model = meta_model(source, torch.float32)       # its config read after check_gguf_header
    arch, _, shapes = _gguf_header(source.path)
    kind = next((k for k, name in gguf.MODEL_ARCH_NAMES.items() if name == arch), None)
    if kind is None:
        return                                      # an architecture gguf does not know: transformers refuses it
    names = gguf.get_tensor_name_map(kind, model.config.num_hidden_layers)
    for name, param in model.named_parameters():    # a tied parameter once
        module, _, suffix = name.rpartition(".")
        base = names.get_name(module)
        if base is None:
            continue                                # not one gguf names: transformers' check after loading applies
        key = f"{base}.{suffix}"
        if key not in shapes:
            raise TampError(f"GGUF file {source.path} has no tensor {key} ({name}), which the model its header "
                            f"describes needs: {_GGUF_FIX}")
        if list(shapes[key]) != list(param.shape):
            raise TampError(f"tensor {key} of {source.path} has shape {list(shapes[key])} where its header gives "
                            f"{list(param.shape)}{_sized_by(model.config, arch, key, shapes[key], param.shape)}: "
                            f"the header and the tensors disagree; {_GGUF_FIX}")


#: the config field behind each dimension of a GGUF tensor, by kind (``blk.N.KIND.weight``); a number
#: of heads counts head_dim rows each
_GGUF_DIMS = {"token_embd": ("vocab_size", "hidden_size"), "output": ("vocab_size", "hidden_size"),
              "attn_q": ("num_attention_heads", "hidden_size"), "attn_k": ("num_key_value_heads", "hidden_size"),
              "attn_v": ("num_key_value_heads", "hidden_size"), "attn_output": ("hidden_size", "num_attention_heads"),
              "ffn_gate": ("intermediate_size", "hidden_size"), "ffn_up": ("intermediate_size", "hidden_size"),
              "ffn_down": ("hidden_size", "intermediate_size"), "attn_norm": ("hidden_size",),
              "ffn_norm": ("hidden_size",), "output_norm": ("hidden_size",)}
#: where a GGUF header (``ARCH.KEY``) gives those fields
_GGUF_KEYS = {"vocab_size": "vocab_size", "hidden_size": "embedding_length", "intermediate_size": "feed_forward_length",
              "num_attention_heads": "attention.head_count", "num_key_value_heads": "attention.head_count_kv"}


def _sized_by(config, arch: str, key: str, stored, expected) -> str:
    """`` (ARCH.KEY: FIELD VALUE, ...)``: the header sizes behind the dimensions of tensor ``key``
    where the header's shape ``expected`` differs from the ``stored`` one."""
    fields = _GGUF_DIMS.get(key.split(".")[-2], ())
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // max(config.num_attention_heads, 1)
    named = []
    for field, found, wanted in zip(fields, stored, expected):
        if found != wanted:
            heads = f", of head_dim {head_dim}" if field.endswith("_heads") else ""
            named.append(f"{arch}.{_GGUF_KEYS[field]}: {field} {getattr(config, field, '?')}{heads}")
    return f" ({'; '.join(named)})" if named else ""


def _gguf_header(path: Path) -> tuple[str, object, dict[str, tuple[int, ...]]]:
    """(architecture, ``ARCH.block_count``, tensor name -> shape in torch order) from a GGUF file's
    header, read once per version of the file; no tensor is read."""
    stat = path.stat()
    return _read_gguf_header(path, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _read_gguf_header(path: Path, size: int, mtime_ns: int) -> tuple[str, object, dict[str, tuple[int, ...]]]:
    header = read_gguf_header(path)
    arch = header.metadata.get("general.architecture", "")
    return arch, header.metadata.get(f"{arch}.block_count"), header.shapes


def load_checked(source: ModelSource, dtype: torch.dtype = torch.float32, *,
                 allow_nonfinite: bool = False) -> torch.nn.Module:
    """:func:`~tamp_fx.load.source.load_model` after :func:`check_checkpoint`; then every floating
    tensor of the loaded model is checked for NaN and inf (unless ``allow_nonfinite``)."""
    index = check_checkpoint(source)
    net = load_model(source, dtype)
    if not allow_nonfinite:                                   # named as stored (a GGUF: as loaded)
        check_tensors(net.state_dict().items(), source.path, key=index.key if index else str)
    return net


def check_tensors(tensors: Iterable[tuple[str, torch.Tensor]], where, *, key: Callable[[str], str] = str) -> None:
    """Refuse tensors holding NaN or inf, naming the first (as ``key`` gives its name)."""
    for name, tensor in tensors:
        check_finite(tensor, key(name), where)


def check_program(ep: torch.export.ExportedProgram, where, *, allow_nonfinite: bool = False) -> None:
    """An exported program's parameters, buffers and tensor constants checked for NaN and inf
    (unless ``allow_nonfinite``)."""
    if not allow_nonfinite:
        constants = ((n, t) for n, t in ep.constants.items() if isinstance(t, torch.Tensor))
        check_tensors([*ep.state_dict.items(), *constants], where)
