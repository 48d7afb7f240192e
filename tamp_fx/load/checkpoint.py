"""Checkpoints: where each tensor of a model is stored, the model on the meta device, and its
parts read from the shards (materialised) and released, one decoder layer at a time."""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from tamp_fx.errors import TampError, first_line
from tamp_fx.load.fingerprint import FingerprintSample, sample_positions
from tamp_fx.load.source import ModelSource, load_config, model_class, weight_files
from tamp_fx.runtime.tensor_file import DTYPES

log = logging.getLogger(__name__)

def checkpoint_keys(source: ModelSource) -> dict[str, Path]:
    """Every tensor name of a Hugging Face checkpoint and the shard that holds it."""
    keys: dict[str, Path] = {}
    for shard in weight_files(source.path):
        try:
            with safe_open(shard, "pt") as f:
                keys.update({k: shard for k in f.keys()})
        except Exception as error:  # noqa: BLE001
            raise TampError(f"could not load model {source.path}: weights file {shard.name} is unreadable "
                            f"({first_line(error)}): re-download or re-save the model") from error
    return keys


@dataclass(frozen=True)
class CheckpointIndex:
    """Where every in-memory tensor of a model is stored: name -> (checkpoint key, shard).

    The names are the ones transformers itself loads the checkpoint under: every key is renamed
    with the model's own conversion mapping (``get_model_conversion_mapping``, as
    ``from_pretrained`` does), so a checkpoint saved in another layout (``language_model.model.layers``
    for ``model.language_model.layers``) is read without loading any tensor. A GGUF file has no
    shards: its names map to themselves. ``unmatched``: what the other checkpoint keys would be
    loaded as (renamed name -> key), no tensor of the model having that name.
    """

    entries: dict[str, tuple[str, Path | None]]
    unmatched: dict[str, str] = field(default_factory=dict)
    _headers: dict[Path, tuple[int, dict]] = field(default_factory=dict, compare=False, repr=False)

    def key(self, name: str) -> str:
        """The checkpoint key of ``name``; for a tensor the checkpoint lacks, the key it would have in
        the checkpoint's layout (:func:`stored_name`), so a refusal names what the user would look for."""
        return self.entries[name][0] if name in self.entries else stored_name(name, self.entries)

    def _header(self, shard: Path) -> tuple[int, dict]:
        if shard not in self._headers:
            self._headers[shard] = read_header(shard)
        return self._headers[shard]

    def stored(self, name: str) -> tuple[str, list[int]]:
        """(safetensors dtype, shape) of the in-memory tensor ``name`` as its shard's header gives them."""
        key, shard = self.entries[name]
        meta = self._header(shard)[1][key]
        return meta["dtype"], meta["shape"]

    def read(self, names: list[str], dtype: torch.dtype, fingerprints: dict[str, FingerprintSample] | None = None,
             *, allow_nonfinite: bool = False) -> dict[str, torch.Tensor]:
        """The tensors ``names`` on the CPU, floating ones converted to ``dtype``.

        Read with plain file reads, :data:`READ_CHUNK_BYTES` at a time, converted chunk by chunk: no memory map
        (its pages would count as this process's memory) and no whole stored copy beside the
        converted one, so reading costs the result's memory only. With ``fingerprints``, the
        :func:`fingerprint_sample` of every stored 2-D floating tensor (before conversion) is put there.
        A tensor holding NaN or inf is refused as it is read (:func:`check_finite`) unless ``allow_nonfinite``.
        """
        out = {}
        for name in names:
            key, shard = self.entries[name]
            start, header = self._header(shard)
            meta = header[key]
            stored = torch_dtype(meta["dtype"], key, shard.parent)
            target = dtype if stored.is_floating_point else stored
            tensor = torch.empty(meta["shape"], dtype=target)
            flat, numel = tensor.view(-1), tensor.numel()
            want = fingerprints is not None and tensor.dim() == 2 and stored.is_floating_point
            idx = sample_positions(numel) if want else None
            parts = []
            step = max(1, READ_CHUNK_BYTES // stored.itemsize)
            with open(shard, "rb") as f:
                f.seek(start + meta["data_offsets"][0])
                for a in range(0, numel, step):
                    n = min(step, numel - a)
                    chunk = flat[a:a + n] if target == stored else torch.empty(n, dtype=stored)
                    if f.readinto(chunk.view(torch.uint8).numpy()) != n * stored.itemsize:
                        raise TampError(f"could not load model {shard.parent}: weights file {shard.name} ends inside "
                                        f"tensor {key}: re-download or re-save the model")
                    if not allow_nonfinite:
                        check_finite(chunk, key, shard.parent)
                    if target != stored:
                        flat[a:a + n].copy_(chunk)
                    if idx is not None:
                        parts.append(chunk[idx[(idx >= a) & (idx < a + n)] - a].float())
            if idx is not None:
                fingerprints[name] = (tuple(tensor.shape), torch.cat(parts).numpy().tobytes())
            out[name] = tensor
        return out

    def dtype(self, names: list[str]) -> torch.dtype:
        """The most common floating dtype of the stored tensors ``names`` (float32 for a GGUF)."""
        counts: dict[torch.dtype, int] = {}
        for name in names:
            key, shard = self.entries.get(name, (name, None))
            if shard is not None:
                dtype = SAFETENSORS_DTYPES.get(self._header(shard)[1][key]["dtype"])
                if dtype is not None and dtype.is_floating_point:
                    counts[dtype] = counts.get(dtype, 0) + 1
        return max(counts, key=counts.get) if counts else torch.float32


READ_CHUNK_BYTES = 64 << 20       # checkpoint tensors are read and converted this much at a time
#: the safetensors dtypes tamp-fx reads; floating weights must be stored in one of the floating ones
SAFETENSORS_DTYPES = {k: DTYPES[k] for k in ("F64", "F32", "BF16", "F16", "I64", "I32", "I16", "I8", "U8", "BOOL")}
FLOATING = tuple(k for k, v in SAFETENSORS_DTYPES.items() if v.is_floating_point)
#: bytes per element of every safetensors dtype, read or not (a header's offsets are checked with it)
_ITEMSIZE = {**{k: v.itemsize for k, v in DTYPES.items()}, "F8_E8M0": 1}
_MAX_HEADER = 100 << 20           # as the safetensors library: a longer header is damage, not a model


def stored_name(name: str, entries: Mapping[str, tuple[str, Any]]) -> str:
    """The key ``name`` would have in a checkpoint whose tensors ``entries`` (name -> (key, ...)) are
    stored renamed: the rename of the tensors under the longest prefix of ``name`` that is renamed (a
    name and its key with their common dotted tail cut off), where those tensors agree; else ``name``.

    >>> entries = {"model.language_model.norm.weight": ("language_model.model.norm.weight", None),
    ...            "lm_head.weight": ("language_model.lm_head.weight", None), "x.weight": ("x.weight", None)}
    >>> stored_name("model.language_model.layers.1.mlp.up_proj.weight", entries)
    'language_model.model.layers.1.mlp.up_proj.weight'
    >>> stored_name("y.weight", entries)          # lm_head and x disagree on the empty prefix: no guess
    'y.weight'
    """
    renames: dict[str, set[str]] = {}             # prefix of in-memory names -> prefixes of their keys
    for memory, (key, *_) in entries.items():
        a, b = memory.split("."), key.split(".")
        tail = 0                                  # dotted parts the two end with alike
        while tail < min(len(a), len(b)) and a[-1 - tail] == b[-1 - tail]:
            tail += 1
        renames.setdefault(".".join(a[:len(a) - tail]), set()).add(".".join(b[:len(b) - tail]))
    under = [p for p in renames if not p or name.startswith(p + ".")]
    prefix = max(under, key=len, default=None)
    if prefix is None or len(renames[prefix]) != 1:
        return name
    (to,) = renames[prefix]
    rest = name[len(prefix) + 1:] if prefix else name
    return f"{to}.{rest}" if to else rest


def torch_dtype(stored: str, key: str, where: Path) -> torch.dtype:
    """The torch dtype of a safetensors dtype name, or one line naming ``key``, its dtype and those read."""
    if stored not in SAFETENSORS_DTYPES:
        raise TampError(f"tensor {key} of {where} is stored as {stored}, which tamp-fx does not read: "
                        f"re-save the model with its weights in {', '.join(FLOATING)}")
    return SAFETENSORS_DTYPES[stored]


def check_finite(tensor: torch.Tensor, key: str, where: Path | str) -> None:
    """Refuse, in one line naming ``key``, a floating ``tensor`` holding NaN or inf. Tensor subclasses
    (torchao's quantized weights, whose ops do not include ``isfinite``) are left to their own code."""
    plain = type(tensor) in (torch.Tensor, torch.nn.Parameter)
    if plain and tensor.is_floating_point() and tensor.numel() and not _all_finite(tensor):
        raise TampError(f"tensor {key} of {where} holds NaN or infinite values: re-download or re-save the model, "
                        "or pass --allow-nonfinite to use it as it is")


def _all_finite(tensor: torch.Tensor) -> bool:
    """Whether a non-empty floating ``tensor`` holds no NaN or inf, in one reduction that allocates
    nothing of its size: ``aminmax`` propagates NaN, and an inf is the max or a -inf the min
    (``isfinite(t).all()`` builds a bool tensor of ``t``'s size first, 60x slower on an 8B weight)."""
    low, high = torch.aminmax(tensor.detach())
    return bool(torch.isfinite(low) & torch.isfinite(high))


def read_header(shard: Path) -> tuple[int, dict]:
    """(offset of the data, key -> {"dtype", "shape", "data_offsets"}) of a safetensors file, every
    entry checked against the file (its offsets within it and as long as its dtype and shape
    say), or one line saying what is wrong: a reader of damaged headers never raises anything else."""
    def bad(why: str) -> TampError:
        return TampError(f"could not load model {shard.parent}: weights file {shard.name} is unreadable ({why}): "
                         "re-download or re-save the model")
    try:
        with open(shard, "rb") as f:
            length = f.read(8)
            size = int.from_bytes(length, "little")
            end = f.seek(0, 2)
            if len(length) < 8 or size > min(end - 8, _MAX_HEADER):
                raise bad(f"its header length {size if len(length) == 8 else 'is cut short'} does not fit the file")
            f.seek(8)
            header = json.loads(f.read(size))
    except (OSError, ValueError, RecursionError) as error:      # UnicodeDecodeError is a ValueError
        raise bad(first_line(error)) from error
    if not isinstance(header, dict):
        raise bad("its header is not a JSON object")
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        if not (isinstance(meta, dict) and isinstance(meta.get("dtype"), str) and isinstance(meta.get("shape"), list)
                and all(type(d) is int and d >= 0 for d in meta["shape"]) and isinstance(meta.get("data_offsets"), list)
                and len(meta["data_offsets"]) == 2 and all(type(o) is int for o in meta["data_offsets"])):
            raise bad(f"the header entry of {key} is not a dtype, a shape and two offsets")
        begin, stop = meta["data_offsets"]
        nbytes = math.prod(meta["shape"]) * _ITEMSIZE.get(meta["dtype"], 0)
        if not 0 <= begin <= stop <= end - 8 - size or (meta["dtype"] in _ITEMSIZE and stop - begin != nbytes):
            raise bad(f"tensor {key}'s offsets {meta['data_offsets']} do not fit its shape or the file")
    return 8 + size, header


def stored_fingerprint(shard: Path, key: str, header: tuple[int, dict], *,
                       allow_nonfinite: bool = False) -> FingerprintSample:
    """:func:`fingerprint_sample` of tensor ``key`` of the safetensors file ``shard`` (``header``: its
    :func:`read_header`), from the sampled values alone: one read of one value each (4,096 at most),
    not the tensor, which ``apply`` reads once afterwards, to write it. A sampled NaN or inf is
    refused (:func:`check_finite`) unless ``allow_nonfinite``: the rest are, as the tensor is read."""
    start, entries = header
    meta = entries[key]
    stored, shape = torch_dtype(meta["dtype"], key, shard.parent), tuple(meta["shape"])
    idx = sample_positions(math.prod(shape)).tolist()                      # (S,) ascending
    base, size = start + meta["data_offsets"][0], stored.itemsize
    with open(shard, "rb") as f:
        raw = b"".join(os.pread(f.fileno(), size, base + i * size) for i in idx)
    if len(raw) != len(idx) * size:
        raise TampError(f"could not load model {shard.parent}: weights file {shard.name} ends inside tensor {key}: "
                        "re-download or re-save the model")
    values = torch.frombuffer(bytearray(raw), dtype=stored) if raw else torch.empty(0, dtype=stored)   # (S,)
    if not allow_nonfinite:
        check_finite(values, key, shard.parent)
    return shape, values.float().numpy().tobytes()


def checkpoint_index(source: ModelSource, model: torch.nn.Module) -> CheckpointIndex:
    """The :class:`CheckpointIndex` of ``model`` (real or on the meta device) loaded from ``source``."""
    names = model.state_dict().keys()
    if source.kind == "gguf":
        return CheckpointIndex({n: (n, None) for n in names})
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    meta_state = {n: True for n in names}
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    entries: dict[str, tuple[str, Path | None]] = {}
    unmatched: dict[str, str] = {}
    for key, shard in checkpoint_keys(source).items():
        name, converted = rename_source_key(key, renamings, converters, model.base_model_prefix, meta_state)
        if name not in meta_state and key in meta_state:
            name, converted = key, None
        if converted is not None:
            raise TampError(f"checkpoint tensor {key} of {source.path} is converted on loading ({converted}): tamp-fx "
                            "reads and writes every weight as one stored tensor, so it cannot prune this checkpoint")
        if name in meta_state:
            entries[name] = (key, shard)
        else:
            unmatched[name] = key
    return CheckpointIndex(entries, unmatched)


def checkpoint_dtype(source: ModelSource, index: CheckpointIndex, names: list[str]) -> torch.dtype:
    """The dtype the checkpoint stores ``names`` in (a GGUF is de-quantized to float32)."""
    return torch.float32 if source.kind == "gguf" else index.dtype(names)


def stored_dtype(source: ModelSource) -> torch.dtype:
    """The dtype most of the checkpoint's weights are stored in (float32 for a de-quantized GGUF)."""
    if source.kind == "gguf":
        return torch.float32
    model = meta_model(source, torch.float32)
    return checkpoint_index(source, model).dtype([n for n, p in model.named_parameters() if p.dim() == 2])


def meta_model(source: ModelSource, dtype: torch.dtype) -> torch.nn.Module:
    """The model of ``source`` (a Hugging Face directory or a GGUF file) built on the meta device
    (no memory, nothing read), in eval mode with sdpa attention, its floating tensors declared in ``dtype``."""
    config = load_config(source)
    config._attn_implementation = "sdpa"
    try:
        cls = model_class(config)             # an Auto class where the config names no architecture (a GGUF's)
        with torch.device("meta"):
            model = (getattr(cls, "_from_config", None) or cls.from_config)(config, dtype=dtype)
    except Exception as error:  # noqa: BLE001
        raise TampError(f"could not build model {source.path} from its config: {first_line(error)}") from error
    return model.eval()


def materialise(model: torch.nn.Module, stored: Mapping[str, torch.Tensor], dtype: torch.dtype,
                device: torch.device, *, within: str = "", exclude: str | None = None) -> None:
    """Put the ``stored`` tensors (in-memory name -> tensor read from the checkpoint) into a
    meta-device ``model`` on ``device`` (floating ones in ``dtype``), then compute the
    non-persistent buffers (rotary frequencies, position ids) of the modules under ``within``
    and not under ``exclude`` with the model's own ``_init_weights``, as ``from_pretrained`` does."""
    state = {}
    for name, tensor in stored.items():
        state[name] = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype)
    model.load_state_dict(state, strict=False, assign=True)
    for name, module in model.named_modules():
        if not _under(name, within) or (exclude is not None and _under(name, exclude)):
            continue
        buffers = [b for b, t in module.named_buffers(recurse=False) if t is not None and t.is_meta]
        if not buffers:
            continue
        for t in [*module.parameters(), *module.buffers()]:
            t._is_hf_initialized = True                       # read from the checkpoint: init functions skip it
        for b in buffers:
            module._buffers[b] = torch.empty_like(module._buffers[b], device=device)
        _pretrained_owner(model, name)._init_weights(module)


def _under(name: str, prefix: str) -> bool:
    return prefix == "" or name == prefix or name.startswith(prefix + ".")


def _pretrained_owner(model: torch.nn.Module, name: str):
    """The innermost PreTrainedModel holding the module ``name`` (its ``_init_weights`` applies)."""
    from transformers import PreTrainedModel
    owner = model
    parts = name.split(".") if name else []
    module = model
    for part in parts:
        module = getattr(module, part)
        if isinstance(module, PreTrainedModel):
            owner = module
    return owner


def release(model: torch.nn.Module, names: list[str] | None = None) -> None:
    """Move tensors (``names``, or all) of ``model`` back to the meta device, freeing their memory."""
    wanted = None if names is None else set(names)
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        for store in (module._parameters, module._buffers):
            for attr, t in store.items():
                if t is not None and not t.is_meta and (wanted is None or prefix + attr in wanted):
                    store[attr] = (torch.nn.Parameter(t.detach().to("meta"), requires_grad=t.requires_grad)
                                   if isinstance(t, torch.nn.Parameter) else t.detach().to("meta"))


