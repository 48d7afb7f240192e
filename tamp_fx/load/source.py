"""Model sources: a Hugging Face directory, a GGUF file or an exported program (``.pt2``),
recognised in one line, and the config, model and processor read from them."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

from tamp_fx.errors import TampError, first_line
from tamp_fx.load import processors
from tamp_fx.load.adapters import family_for, family_of

log = logging.getLogger(__name__)

_HINT = "pass a Hugging Face model directory (config.json + *.safetensors), a .gguf file or a .pt2 exported program"
#: Pickle files: unpickling runs whatever code the file names, so tamp-fx never loads them.
PICKLE_SUFFIXES = frozenset({".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle"})
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


def resolve_source(path: str | os.PathLike | ModelSource) -> ModelSource:
    """What ``path`` is (a ModelSource is returned as it is), or one line saying what it should be."""
    if isinstance(path, ModelSource):
        return path
    p = Path(path).expanduser()
    if not p.exists():
        raise TampError(f"model {p} does not exist: {_HINT}")
    if p.is_file() and p.suffix == ".gguf":
        with p.open("rb") as f:
            if f.read(4) != b"GGUF":
                raise TampError(f"model {p} is not a GGUF file (it does not start with 'GGUF'): {_HINT}")
    if p.is_file() and p.suffix in (".gguf", ".pt2"):
        return ModelSource(p.resolve(), p.suffix[1:])
    if p.is_file() and p.suffix in PICKLE_SUFFIXES:
        raise TampError(f"model {p} is a {p.suffix} pickle: {_PICKLE_HINT}")
    if p.is_file():
        raise TampError(f"model {p} is a {p.suffix or 'plain'} file: {_HINT}")
    if not (p / "config.json").is_file():
        raise TampError(f"model directory {p} has no config.json: {_HINT}")
    if not weight_files(p):
        if any(f.suffix in PICKLE_SUFFIXES for f in p.iterdir()):
            raise TampError(f"model directory {p} has only pickled weights (no *.safetensors): {_PICKLE_HINT}")
        raise TampError(f"model directory {p} has no *.safetensors weights: {_HINT}")
    return ModelSource(p.resolve(), "hf")


def weight_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.safetensors"))


# weights in other formats and their indexes: beside the pruned safetensors they would be the
# original, unpruned model (and a loader that prefers them would load it)
def load_config(source: ModelSource):
    """The model's transformers config; an unsupported ``model_type`` is refused before
    transformers sees it, with the list of supported ones."""
    if source.kind == "pt2":
        raise TampError(f"{source.path} is an exported program (.pt2): only `plan` and `apply` take one; "
                        "this command needs a Hugging Face directory or a .gguf file")
    try:
        if source.kind == "gguf":
            from tamp_fx.load.validate import check_gguf_header  # (validate imports this module)
            check_gguf_header(source)         # before transformers builds a config of as many layers
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


def model_class(config):
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
    cls = model_class(config)
    try:
        if source.kind == "gguf":
            with _quiet_gguf_reader():
                quantized, info = cls.from_pretrained(source.directory, gguf_file=source.path.name, dtype=dtype,
                                                      output_loading_info=True)
            _refuse_missing(source, info)
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
            model, info = cls.from_pretrained(source.path, dtype=dtype, attn_implementation="sdpa", use_safetensors=True,
                                              output_loading_info=True)
            _refuse_missing(source, info)
    except TampError:
        raise
    except Exception as error:  # noqa: BLE001 - corrupt files surface from deep inside transformers
        raise TampError(f"could not load model {source.path} ({first_line(error)}): check that its files are complete "
                        f"and readable by transformers {transformers.__version__}") from error
    return model.eval()


def _refuse_missing(source: ModelSource, info: dict) -> None:
    """Refuse what ``from_pretrained`` would initialise at random: a tensor missing from the file or of another shape."""
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise TampError(f"model {source.path} has no tensor {missing[0]}"
                        f"{f' ({len(missing)} missing)' if len(missing) > 1 else ''}, which the model needs: "
                        "re-download or re-save the model")
    for key, found, expected in info.get("mismatched_keys") or []:
        raise TampError(f"tensor {key} of {source.path} has shape {list(found)} where its config gives "
                        f"{list(expected)}: re-download or re-save the model")


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


