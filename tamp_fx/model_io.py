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
from dataclasses import dataclass
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
            raise TampError(f"weights file {shard} is unreadable ({str(error).splitlines()[0]}): re-download or re-save the model") from error
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
