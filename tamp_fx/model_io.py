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
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
            raise TampError(f"weights file {shard} is unreadable ({first_line(error)}): re-download or re-save the model") from error
    return keys


def checkpoint_names(source: ModelSource, params: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """Map in-memory parameter names to the names the checkpoint stores them under.

    Identical names map to themselves. Otherwise (a checkpoint saved in another layout, such
    as ``language_model.model.layers`` for ``model.language_model.layers``) the first weight
    is found by content (longest common name suffix, same shape, same values) and the prefix
    rename it reveals is reused for the rest.
    """
    if source.kind == "gguf":
        return {name: name for name in params}
    keys = checkpoint_keys(source)
    renames: list[tuple[str, str]] = []       # (in-memory prefix, checkpoint prefix)
    mapping = {}
    for name, tensor in params.items():
        if name in keys:
            mapping[name] = name
            continue
        renamed = [ckpt + name[len(mem):] for mem, ckpt in renames if name.startswith(mem)]
        found = next((k for k in renamed if k in keys), None)
        if found is None:
            found = _match_by_suffix(name, tensor, keys)
            suffix = os.path.commonprefix([name[::-1], found[::-1]])[::-1]
            suffix = suffix[suffix.find(".") + 1:] if not suffix.startswith(".") else suffix[1:]
            renames.append((name[: len(name) - len(suffix)], found[: len(found) - len(suffix)]))
        mapping[name] = found
    return mapping


def _match_by_suffix(name: str, tensor: torch.Tensor, keys: Mapping[str, Path]) -> str:
    parts = name.split(".")
    for start in range(1, len(parts)):
        suffix = ".".join(parts[start:])
        for key in (k for k in keys if k.endswith("." + suffix) or k == suffix):
            with safe_open(keys[key], "pt") as f:
                stored = f.get_tensor(key)
            if stored.shape == tensor.shape and torch.equal(stored.to(tensor.dtype), tensor.detach().cpu()):
                return key
    raise TampError(f"parameter {name} has no counterpart in the checkpoint of this model: is the directory complete?")


# --- fingerprint ------------------------------------------------------------------------

def fingerprint(tensors: Mapping[str, torch.Tensor], samples: int = 4096) -> str:
    """A digest of the named tensors: names, shapes and an evenly strided sample of values
    (as float32), so two models with the same architecture but other weights differ."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().reshape(-1)
        idx = torch.linspace(0, t.numel() - 1, min(samples, t.numel())).long()
        digest.update(name.encode())
        digest.update(str(tuple(tensors[name].shape)).encode())
        digest.update(t[idx].float().cpu().numpy().tobytes())
    return "sha256:" + digest.hexdigest()[:32]


# --- safe output ------------------------------------------------------------------------

#: Outputs committed by this process (the CLI's Ctrl-C message says whether any exist).
WRITTEN: list[Path] = []

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
    _check_writable(out)
    return out


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
        yield tmp
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
