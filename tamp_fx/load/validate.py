"""A model checked before any work: every tensor the model needs is in the checkpoint, with the
shape its config gives and a dtype tamp-fx computes with (from the safetensors headers alone,
nothing read), and no weight holds NaN or inf (checked as the tensors are read, unless allowed).
Each refusal is one line naming the tensor.

Every way in goes through here: :func:`check_checkpoint` for a Hugging Face directory read layer by
layer (:func:`tamp_fx.load.checkpoint.CheckpointIndex.read` checks values as it reads),
:func:`load_checked` for a model loaded whole (a Hugging Face directory or a GGUF file), and
:func:`check_program` for an exported program, whose archive :func:`tamp_fx.load.program.load_program`
checks (zip CRCs, constants) as it loads it.
"""
from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable

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
from tamp_fx.load.source import ModelSource, load_model

_FIX = "re-download or re-save the model"


def check_checkpoint(source: ModelSource, model: torch.nn.Module | None = None,
                     index: CheckpointIndex | None = None) -> CheckpointIndex | None:
    """Refuse a Hugging Face checkpoint that lacks a parameter the model needs (a tied one aside),
    stores one in another shape than the config gives, or stores a floating weight in a dtype
    other than F32, F16, BF16 or F64: from the shards' headers, before anything is read.
    ``model`` (on the meta device) and ``index``: the caller's, when it has them; the index is
    returned. A GGUF file has no headers of that kind (None), and a quantized checkpoint's tensors are
    its quantizer's: :func:`load_checked` checks those once loaded."""
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
    return f"model {source.path} has no tensor {name}{count}, which the model needs{hint}: {_FIX}"


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
