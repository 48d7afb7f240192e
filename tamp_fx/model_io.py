"""Model I/O: read a Hugging Face directory or a GGUF file, name weights as the checkpoint
does, fingerprint a model, and write pruned checkpoints atomically."""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors import safe_open

from tamp_fx import processors
from tamp_fx.adapters import family_for, family_of
from tamp_fx.errors import TampError

log = logging.getLogger(__name__)

_HINT = "pass a Hugging Face model directory (config.json + *.safetensors), a .gguf file or a .pt2 exported program"
#: Pickle files: unpickling runs whatever code the file names, so tamp-fx never loads them.
_PICKLE_SUFFIXES = frozenset({".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle"})
_PICKLE_HINT = ("tamp-fx does not load pickles, which can run code: save the model as safetensors "
                "(save_pretrained) or export it with torch.export.save to a .pt2 file")


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: a Hugging Face directory, a GGUF file or an exported program."""

    path: Path
    kind: str                        # "hf", "gguf" or "pt2" (torch.export.save)

    @property
    def directory(self) -> Path:
        return self.path if self.kind == "hf" else self.path.parent


def resolve_source(path: str | os.PathLike) -> ModelSource:
    p = Path(path).expanduser()
    if not p.exists():
        raise TampError(f"model {p} does not exist: {_HINT}")
    if p.is_file() and p.suffix in (".gguf", ".pt2"):
        return ModelSource(p.resolve(), p.suffix[1:])
    if p.is_file() and p.suffix in _PICKLE_SUFFIXES:
        raise TampError(f"model {p} is a {p.suffix} pickle: {_PICKLE_HINT}")
    if p.is_file():
        raise TampError(f"model {p} is a {p.suffix or 'plain'} file: {_HINT}")
    if not (p / "config.json").is_file():
        raise TampError(f"model directory {p} has no config.json: {_HINT}")
    if not _weight_files(p):
        if any(f.suffix in _PICKLE_SUFFIXES for f in p.iterdir()):
            raise TampError(f"model directory {p} has only pickled weights (no *.safetensors): {_PICKLE_HINT}")
        raise TampError(f"model directory {p} has no *.safetensors weights: {_HINT}")
    return ModelSource(p.resolve(), "hf")


def _weight_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.safetensors"))


def load_config(source: ModelSource):
    """The model's transformers config; an unsupported ``model_type`` is refused before
    transformers sees it, with the list of supported ones."""
    if source.kind == "pt2":
        raise TampError(f"{source.path} is an exported program (.pt2): only `plan` and `apply` take one; "
                        "this command needs a Hugging Face directory or a .gguf file")
    try:
        if source.kind == "gguf":
            config = transformers.AutoConfig.from_pretrained(source.directory, gguf_file=source.path.name)
        else:
            raw = json.loads((source.path / "config.json").read_text())
            family_for(raw.get("model_type") if isinstance(raw, dict) else None)
            config = transformers.AutoConfig.from_pretrained(source.path)
    except (OSError, ValueError, AttributeError, json.JSONDecodeError) as error:
        raise TampError(f"could not read the config of {source.path} ({str(error).splitlines()[0]}): "
                        "is the model directory complete?") from error
    family_of(config)
    return config


def _model_class(config):
    family = family_of(config)
    for name in (getattr(config, "architectures", None) or []):
        if hasattr(transformers, name):
            return getattr(transformers, name)
    return getattr(transformers, family.auto_class)


@contextlib.contextmanager
def _quiet_gguf_reader() -> Iterator[None]:
    """Without transformers' own tqdm bar over GGUF tensors (it ignores disable_progress_bar)."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    original = gguf_utils.tqdm
    gguf_utils.tqdm = lambda iterable, *args, **kwargs: iterable
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def load_model(source: ModelSource, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Load the model in eval mode with sdpa attention. A GGUF file is de-quantized and rebuilt
    from its config without ``quantization_config`` so that it can be saved like any model.
    Only safetensors or GGUF weights are read, and no code from the model directory runs
    (``trust_remote_code`` stays off: supported families are transformers' own classes)."""
    config = load_config(source)
    cls = _model_class(config)
    try:
        if source.kind == "gguf":
            with _quiet_gguf_reader():
                quantized = cls.from_pretrained(source.directory, gguf_file=source.path.name, dtype=dtype)
            cls, config = type(quantized), quantized.config
            if hasattr(config, "quantization_config"):
                del config.quantization_config
            config.architectures = [cls.__name__]
            config._attn_implementation = "sdpa"
            model = cls._from_config(config, dtype=dtype)
            model.load_state_dict(quantized.state_dict())
            del quantized
        else:
            # use_safetensors: never fall back to pickled *.bin weights; trust_remote_code is never passed
            model = cls.from_pretrained(source.path, dtype=dtype, attn_implementation="sdpa", use_safetensors=True)
    except TampError:
        raise
    except Exception as error:  # noqa: BLE001 - corrupt files surface from deep inside transformers
        raise TampError(f"could not load model {source.path}: {str(error).splitlines()[0] if str(error) else type(error).__name__}") from error
    return model.eval()


def load_processor(source: ModelSource, config=None):
    """The processor (multimodal) or tokenizer (text-only) that came with the model."""
    config = config if config is not None else load_config(source)
    family = family_of(config)
    try:
        if source.kind == "gguf":
            return transformers.AutoTokenizer.from_pretrained(source.directory, gguf_file=source.path.name)
        if family.has_processor:
            return processors.load_processor(source.path)
        return transformers.AutoTokenizer.from_pretrained(source.path)
    except Exception as error:  # noqa: BLE001
        raise TampError(f"could not load the processor of {source.path}: {str(error).splitlines()[0]}") from error


# --- checkpoint names -------------------------------------------------------------------

def checkpoint_keys(source: ModelSource) -> dict[str, Path]:
    """Every tensor name of a Hugging Face checkpoint and the shard that holds it."""
    keys: dict[str, Path] = {}
    for shard in _weight_files(source.path):
        try:
            with safe_open(shard, "pt") as f:
                keys.update({k: shard for k in f.keys()})
        except Exception as error:  # noqa: BLE001
            raise TampError(f"could not load model {source.path}: weights file {shard.name} is unreadable "
                            f"({str(error).splitlines()[0]}): re-download or re-save the model") from error
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
                                f"({str(error).splitlines()[0]}): re-download or re-save the model") from error
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
            model = _model_class(config)._from_config(config, dtype=dtype)
    except Exception as error:  # noqa: BLE001
        raise TampError(f"could not build model {source.path} from its config: {str(error).splitlines()[0]}") from error
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


# --- fingerprint ------------------------------------------------------------------------

#: what a fingerprint keeps of one tensor: its shape and an evenly strided sample of values (float32 bytes)
FingerprintSample = tuple[tuple[int, ...], bytes]


def fingerprint_sample(tensor: torch.Tensor, samples: int = 4096) -> FingerprintSample:
    t = tensor.detach().reshape(-1)
    idx = torch.linspace(0, t.numel() - 1, min(samples, t.numel())).long()
    return tuple(tensor.shape), t[idx.to(t.device)].float().cpu().numpy().tobytes()


def fingerprint_of(samples: Mapping[str, FingerprintSample]) -> str:
    """The digest of named :func:`fingerprint_sample` results (see :func:`fingerprint`)."""
    digest = hashlib.sha256()
    for name in sorted(samples):
        shape, values = samples[name]
        digest.update(name.encode())
        digest.update(str(shape).encode())
        digest.update(values)
    return "sha256:" + digest.hexdigest()[:32]


def fingerprint(tensors: Mapping[str, torch.Tensor], samples: int = 4096) -> str:
    """A digest of the named tensors: names, shapes and an evenly strided sample of values
    (as float32), so two models with the same architecture but other weights differ."""
    return fingerprint_of({name: fingerprint_sample(t, samples) for name, t in tensors.items()})


# --- atomic output ----------------------------------------------------------------------

@contextlib.contextmanager
def atomic_directory(out: Path, *, overwrite: bool, protect: tuple[Path, ...] = ()) -> Iterator[Path]:
    """Yield a temporary directory beside ``out`` that becomes ``out`` only if the block
    finishes; an interrupted run leaves nothing at ``out``. Refuses to replace any path in
    ``protect`` (the inputs) or an existing ``out`` unless ``overwrite``."""
    out = Path(out).expanduser().absolute()
    for p in protect:
        p = Path(p).resolve()
        if out.resolve() == p or p.is_relative_to(out.resolve()) or out.resolve().is_relative_to(p):
            raise TampError(f"output {out} would overwrite or sit inside the input {p}: choose another --out")
    if out.exists() and not overwrite:
        raise TampError(f"output {out} already exists: choose another --out or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


@contextlib.contextmanager
def atomic_file(out: Path, *, overwrite: bool, protect: tuple[Path, ...] = ()) -> Iterator[Path]:
    """Like :func:`atomic_directory` for one file: yield a temporary path beside ``out`` (same
    suffix) that replaces ``out`` only if the block finishes."""
    out = Path(out).expanduser().absolute()
    if any(out.resolve() == Path(p).resolve() for p in protect):
        raise TampError(f"output {out} would overwrite the input: choose another --out")
    if out.exists() and not overwrite:
        raise TampError(f"output {out} already exists: choose another --out or pass --overwrite")
    if out.is_dir():
        raise TampError(f"output {out} is a directory: pass a file name such as pruned{out.suffix or '.pt2'}")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.tmp-", suffix=out.suffix, dir=out.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, out)
