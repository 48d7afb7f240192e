"""Checkpoints: where each tensor of a model is stored, the model on the meta device, and its
parts read from the shards (materialised) and released, one decoder layer at a time."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from tamp_fx.errors import TampError, first_line
from tamp_fx.load.fingerprint import FingerprintSample
from tamp_fx.load.source import ModelSource, load_config, model_class, weight_files

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
    shards: its names map to themselves.
    """

    entries: dict[str, tuple[str, Path | None]]
    _headers: dict[Path, tuple[int, dict]] = field(default_factory=dict, compare=False, repr=False)

    def key(self, name: str) -> str:
        return self.entries[name][0] if name in self.entries else name

    def _header(self, shard: Path) -> tuple[int, dict]:
        """(offset of the data, key -> {"dtype", "shape", "data_offsets"}) of a safetensors shard."""
        if shard not in self._headers:
            try:
                with open(shard, "rb") as f:
                    size = int.from_bytes(f.read(8), "little")
                    header = json.loads(f.read(size))
                self._headers[shard] = (8 + size, header)
            except (OSError, ValueError, MemoryError) as error:
                raise TampError(f"could not load model {shard.parent}: weights file {shard.name} is unreadable "
                                f"({first_line(error)}): re-download or re-save the model") from error
        return self._headers[shard]

    def read(self, names: list[str], dtype: torch.dtype,
             fingerprints: dict[str, FingerprintSample] | None = None) -> dict[str, torch.Tensor]:
        """The tensors ``names`` on the CPU, floating ones converted to ``dtype``.

        Read with plain file reads, :data:`READ_CHUNK_BYTES` at a time, converted chunk by chunk: no memory map
        (its pages would count as this process's memory) and no whole stored copy beside the
        converted one, so reading costs the result's memory only. With ``fingerprints``, the
        :func:`fingerprint_sample` of every stored 2-D floating tensor (before conversion) is put there.
        """
        out = {}
        for name in names:
            key, shard = self.entries[name]
            start, header = self._header(shard)
            meta = header[key]
            stored = _SAFETENSORS_DTYPES[meta["dtype"]]
            target = dtype if stored.is_floating_point else stored
            tensor = torch.empty(meta["shape"], dtype=target)
            flat, numel = tensor.view(-1), tensor.numel()
            want = fingerprints is not None and tensor.dim() == 2 and stored.is_floating_point
            idx = torch.linspace(0, numel - 1, min(4096, numel)).long() if want else None
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
                dtype = _SAFETENSORS_DTYPES.get(self._header(shard)[1][key]["dtype"])
                if dtype is not None and dtype.is_floating_point:
                    counts[dtype] = counts.get(dtype, 0) + 1
        return max(counts, key=counts.get) if counts else torch.float32


READ_CHUNK_BYTES = 64 << 20       # checkpoint tensors are read and converted this much at a time
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


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
    for key, shard in checkpoint_keys(source).items():
        name, converted = rename_source_key(key, renamings, converters, model.base_model_prefix, meta_state)
        if name not in meta_state and key in meta_state:
            name, converted = key, None
        if converted is not None:
            raise TampError(f"checkpoint tensor {key} of {source.path} is converted on loading ({converted}), which "
                            "layer-by-layer loading does not do: plan with --whole-model")
        if name in meta_state:
            entries[name] = (key, shard)
    return CheckpointIndex(entries)


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
    """The model of ``source`` built on the meta device (no memory, nothing read), in eval mode
    with sdpa attention, its floating tensors declared in ``dtype``."""
    if source.kind != "hf":
        raise TampError(f"{source.path} is a .{source.kind} file: only a Hugging Face directory is loaded layer by layer")
    config = load_config(source)
    config._attn_implementation = "sdpa"
    try:
        with torch.device("meta"):
            model = model_class(config)._from_config(config, dtype=dtype)
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


