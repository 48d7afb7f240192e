"""Model I/O: read a Hugging Face directory or a GGUF file, name weights as the checkpoint
does, fingerprint a model, and write pruned checkpoints atomically."""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from safetensors import safe_open

from tamp_fx import processors
from tamp_fx.adapters import family_for, family_of
from tamp_fx.errors import TampError, first_line

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
    if p.is_file() and p.suffix == ".gguf":
        with p.open("rb") as f:
            if f.read(4) != b"GGUF":
                raise TampError(f"model {p} is not a GGUF file (it does not start with 'GGUF'): {_HINT}")
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


# weights in other formats and their indexes: beside the pruned safetensors they would be the
# original, unpruned model (and a loader that prefers them would load it)
_OTHER_WEIGHTS = _PICKLE_SUFFIXES | {".h5", ".msgpack", ".gguf", ".pt2"}
_OTHER_INDEXES = ("pytorch_model.bin.index.json", "tf_model.h5.index.json", "flax_model.msgpack.index.json")


def copy_companions(source: Path, out: Path, *, skip: Collection[str] = ()) -> list[str]:
    """Copy what a checkpoint directory holds besides its weights (configs, tokenizer,
    processor, chat template, README, subfolders) from ``source`` to ``out``; safetensors
    (rewritten by the caller), weights in other formats and the names in ``skip`` are not
    copied. Returns the names of the other-format weights left behind, for a warning."""
    left = []
    for item in sorted(source.iterdir()):
        if item.suffix == ".safetensors" or item.name in skip:
            continue
        if item.is_file() and (item.suffix in _OTHER_WEIGHTS or item.name in _OTHER_INDEXES):
            left.append(item.name)
            continue
        (shutil.copytree if item.is_dir() else shutil.copy2)(item, out / item.name)
    return left


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
    except TampError:
        raise
    except Exception as error:  # noqa: BLE001 - a truncated GGUF header raises struct.error, a bad config anything
        raise TampError(f"could not read the config of {source.path} ({first_line(error)}): "
                        f"is the {'GGUF file' if source.kind == 'gguf' else 'model directory'} complete?") from error
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
        raise TampError(f"could not load model {source.path}: {first_line(error)}") from error
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
        raise TampError(f"could not load the processor of {source.path}: {first_line(error)}") from error


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
            model = _model_class(config)._from_config(config, dtype=dtype)
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


# --- safe output ------------------------------------------------------------------------

#: Outputs committed by this process (the CLI's Ctrl-C message says whether any exist).
WRITTEN: list[Path] = []

#: The file every output directory gets: ``--overwrite`` replaces a directory only when it has
#: one (or is empty), so a mistyped ``--out`` (a home directory, a dataset) is never deleted.
OUTPUT_MARKER = ".tamp-fx-output"
_MARKER_TEXT = "written by tamp-fx: `--overwrite` may replace this directory as a whole\n"

_FS_IOC_GETFLAGS = 0x80086601                # ioctl: a file's ext2-style attribute flags (Linux)
_IMMUTABLE_OR_APPEND_ONLY = 0x10 | 0x20      # FS_IMMUTABLE_FL | FS_APPEND_FL (chattr +i / +a)


def temp_prefix(out: Path) -> str:
    """Name prefix of this process's temporary paths beside ``out``: ``.NAME.tmp-PID-``. The
    pid tells a later run whether the process that left one is still alive."""
    return f".{out.name}.tmp-{os.getpid()}-"


def check_output(out: str | os.PathLike, *, overwrite: bool, protect: tuple[Path, ...] = (), file: bool = False) -> Path:
    """Refuse ``out`` in one line, before any work, if writing it could replace or change an
    input (a path in ``protect``, a directory holding one, or a path inside an input
    directory), if it exists and ``overwrite`` is off, or if its directory cannot be written.
    ``file``: ``out`` is one file (:func:`atomic_file`) rather than a directory. Returns
    ``out`` as an absolute path."""
    out = _absolute(out)
    for given in protect:
        given = _absolute(given)
        for p in {given, given.resolve()}:                    # the name given and where it leads
            for o in {out, out.resolve()}:
                if p.is_relative_to(o):
                    what = "the input" if p == o else "a directory holding the input"
                    raise TampError(f"output {out} would overwrite {what} {given}: choose another --out "
                                    "(inputs are never overwritten, even with --overwrite)")
                if o.is_relative_to(p):
                    raise TampError(f"output {out} would be written inside the input {given}: choose another --out "
                                    "(inputs are never changed)")
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise TampError(f"output {out} already exists: choose another --out or pass --overwrite")
        if file and out.is_dir():
            raise TampError(f"output {out} is a directory: pass a file name such as pruned{out.suffix or '.pt2'}")
        if _immutable(out):
            raise TampError(f"output {out} is immutable or append-only (chattr): it cannot be replaced, choose another --out")
        if not file and not out.is_symlink():       # a symbolic link is replaced, never what it points to
            if not out.is_dir():
                raise TampError(f"output {out} is a file and tamp-fx writes a directory there: --overwrite replaces "
                                "only tamp-fx output directories; choose another --out or remove the file yourself")
            if not _replaceable(out):
                raise TampError(f"output {out} is a directory tamp-fx did not write (no {OUTPUT_MARKER} in it): "
                                "--overwrite replaces only tamp-fx output directories; choose another --out or "
                                "remove it yourself")
    _check_writable(out)
    return out


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _replaceable(directory: Path) -> bool:
    """Whether ``--overwrite`` may replace ``directory``: it is empty or tamp-fx wrote it."""
    try:
        return (directory / OUTPUT_MARKER).is_file() or next(directory.iterdir(), None) is None
    except OSError:
        return False


def _absolute(path: str | os.PathLike) -> Path:
    """``path`` absolute and without ``..`` (symlinks are not followed: callers check both)."""
    return Path(os.path.normpath(Path(path).expanduser().absolute()))


def _immutable(path: Path) -> bool:
    """Whether ``path`` has the immutable or append-only attribute (False where it cannot be read)."""
    try:
        import fcntl
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except (ImportError, OSError):
        return False
    try:
        flags = int.from_bytes(fcntl.ioctl(fd, _FS_IOC_GETFLAGS, bytes(8))[:4], sys.byteorder)
        return bool(flags & _IMMUTABLE_OR_APPEND_ONLY)
    except OSError:
        return False
    finally:
        os.close(fd)


def _check_writable(out: Path) -> None:
    """Create and remove a probe file where ``out`` will be created (its parent, or the nearest
    ancestor that exists): permission bits do not stop root, so only trying tells."""
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise TampError(f"output {out} cannot be created: {parent} is a file, not a directory: choose another --out")
    try:
        fd, probe = tempfile.mkstemp(prefix=temp_prefix(out), suffix=".probe", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        raise TampError(f"output {out} cannot be written: {parent} is not writable ({error.strerror}): "
                        "choose another --out") from error


def remove_stale_temporaries(out: Path) -> None:
    """Remove what runs killed before they finished (SIGKILL, power loss) left beside ``out``:
    ``.NAME.tmp-PID-*`` paths of processes that no longer exist, and ``.NAME.old-PID`` once
    ``out`` exists again (before that it is the only copy of the previous output)."""
    out = Path(out).absolute()
    if not out.parent.is_dir():
        return
    for kind in ("tmp", "old"):
        prefix = f".{out.name}.{kind}-"
        for path in out.parent.iterdir():
            pid = path.name[len(prefix):].split("-", 1)[0] if path.name.startswith(prefix) else ""
            if not pid.isdigit() or _alive(int(pid)) or (kind == "old" and not out.exists()):
                continue
            _remove(path)
            log.warning("removed %s, left by an interrupted run (process %s)", path, pid)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:                # PermissionError: it exists, as another user
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold Ctrl-C (SIGINT) and SIGTERM until the block ends: a rename pair is never cut in half."""
    held = {signal.SIGINT, signal.SIGTERM}
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _commit(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename ``tmp`` to ``out``; an existing ``out`` (only with ``overwrite``) is moved aside
    first and removed after, a file or a directory alike."""
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    with _signals_deferred():
        exists = out.exists() or out.is_symlink()
        if exists and not overwrite:
            raise TampError(f"output {out} appeared while this ran: choose another --out or pass --overwrite")
        if exists:
            os.replace(out, old)
        try:
            os.replace(tmp, out)
        except BaseException:
            if exists:
                os.replace(old, out)               # put the previous output back
            raise
        WRITTEN.append(out)
    if exists:
        _remove(old)


@contextlib.contextmanager
def _atomic(out: Path, overwrite: bool, protect: tuple[Path, ...], file: bool) -> Iterator[Path]:
    out = check_output(out, overwrite=overwrite, protect=protect, file=file)
    remove_stale_temporaries(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if file:
        fd, name = tempfile.mkstemp(prefix=temp_prefix(out), suffix=out.suffix, dir=out.parent)
        os.close(fd)
        tmp = Path(name)
    else:
        tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(out), dir=out.parent))
    try:
        # mkstemp / mkdtemp make 0600 / 0700 paths; an output gets the modes any other file
        # would (the umask's), so a checkpoint can be read by the services and people it is for
        os.chmod(tmp, (0o666 if file else 0o777) & ~_umask())
        yield tmp
        if not file:
            (tmp / OUTPUT_MARKER).write_text(_MARKER_TEXT)
        _commit(tmp, out, overwrite)
    except OSError as error:
        raise TampError(f"could not write {out} ({error.strerror or error}): nothing was written") from error
    finally:
        if tmp.exists() or tmp.is_symlink():
            _remove(tmp)


def atomic_directory(out: Path, *, overwrite: bool, protect: tuple[Path, ...] = ()) -> contextlib.AbstractContextManager[Path]:
    """Yield a temporary directory beside ``out`` that becomes ``out`` only if the block
    finishes; an interrupted run leaves nothing at ``out``. Refuses (:func:`check_output`) any
    ``out`` that would replace, hold or sit inside a path in ``protect`` (the inputs), an
    existing ``out`` unless ``overwrite``, and an ``out`` that cannot be written."""
    return _atomic(out, overwrite, protect, file=False)


def atomic_file(out: Path, *, overwrite: bool, protect: tuple[Path, ...] = ()) -> contextlib.AbstractContextManager[Path]:
    """Like :func:`atomic_directory` for one file: yield a temporary path beside ``out`` (same
    suffix) that replaces ``out`` only if the block finishes."""
    return _atomic(out, overwrite, protect, file=True)
