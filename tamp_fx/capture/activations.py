"""The decoder's inputs: per calibration sample, the hidden states entering the current layer and
what every layer is called with (:class:`Activations`), captured from a Hugging Face model by
:func:`capture_layer_inputs` (an exported program's: :func:`tamp_fx.capture.program.capture_program_inputs`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree

from tamp_fx.capture.record import recording
from tamp_fx.load.adapters import DecoderLayout
from tamp_fx.modality import modality_labels


@dataclass
class Activations:
    """Per calibration sample: the hidden states entering the current layer, the keyword
    arguments each layer is called with, and the modality label of every token.

    They live on ``device`` (where the layers run), or with ``offload`` in host memory (pinned
    when ``device`` is a GPU), moved to ``device`` a sample at a time by :meth:`inputs`.
    """

    hidden: list[torch.Tensor] = field(default_factory=list)              # per sample (1, N, C)
    layer_kwargs: list[list[dict[str, Any]]] = field(default_factory=list)  # [sample][layer]
    labels: list[torch.Tensor] = field(default_factory=list)              # per sample (N,) int8, on the host
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    offload: bool = False

    def __len__(self) -> int:
        return len(self.hidden)

    @property
    def _store(self) -> torch.device:
        return torch.device("cpu") if self.offload else self.device

    def add(self, hidden: torch.Tensor, layer_kwargs: list[dict[str, Any]], labels: torch.Tensor) -> None:
        """Record one sample (tensors shared between layers' kwargs stay shared)."""
        move = _mover(self._store, pin=self.offload and self.device.type == "cuda")
        self.hidden.append(move(hidden))
        self.layer_kwargs.append([pytree.tree_map(move, kw) for kw in layer_kwargs])
        self.labels.append(labels.cpu())

    def inputs(self, sample: int, layer: int) -> tuple[torch.Tensor, dict[str, Any]]:
        """Hidden states (1, N, C) and keyword arguments of ``layer`` for ``sample``, on ``device``."""
        move = _mover(self.device)
        return move(self.hidden[sample]), pytree.tree_map(move, self.layer_kwargs[sample][layer])

    def stash(self, values: Any) -> Any:
        """``values`` (tensors in any nesting) kept until a later :meth:`unstash`: where the hidden
        states are kept (host memory with ``offload``)."""
        if self._store == self.device:
            return values
        return pytree.tree_map(_mover(self._store, pin=self.offload and self.device.type == "cuda"), values)

    def unstash(self, values: Any) -> Any:
        """What :meth:`stash` kept, on ``device``."""
        if self._store == self.device:
            return values
        return pytree.tree_map(_mover(self.device), values)

    def release_hidden(self, sample: int) -> None:
        """Let go of the sample's hidden states before :meth:`set_hidden` replaces them (whoever
        still reads them holds its own reference): a layer's inputs are not kept while it runs."""
        self.hidden[sample] = None

    def set_hidden(self, sample: int, hidden: torch.Tensor) -> None:
        """Replace the sample's hidden states (a layer's outputs, on ``device``)."""
        self.hidden[sample] = _mover(self._store, pin=self.offload and self.device.type == "cuda")(hidden)


def _mover(device: torch.device, pin: bool = False):
    """A function moving tensors to ``device`` (pinned host memory with ``pin``), each distinct
    tensor once, so tensors shared between layers' arguments stay shared; others pass through."""
    memo: dict[int, torch.Tensor] = {}

    def move(x: Any) -> Any:
        if not isinstance(x, torch.Tensor) or (x.device == device and not pin):
            return x
        if id(x) not in memo:
            y = x.detach().to(device, non_blocking=x.is_pinned())
            memo[id(x)] = y.pin_memory() if pin and not y.is_pinned() else y
        return memo[id(x)]
    return move


@torch.no_grad()
def capture_layer_inputs(model: torch.nn.Module, layout: DecoderLayout, samples: list[dict[str, torch.Tensor]],
                         token_ids, progress=None, *, device: torch.device | None = None,
                         offload: bool = False) -> Activations:
    """Run ``model.base_model`` (no LM head) on every sample on ``device`` (default: the CPU) and
    record each decoder layer's call (:func:`~tamp_fx.capture.record.recording`, hidden states
    passed through). Only the parts before and around the decoder layers run, so the layers
    themselves may be on the meta device."""
    names = [layout.layer_prefix(i) for i in range(len(layout.layers))]
    acts = Activations(device=torch.device("cpu") if device is None else device, offload=offload)
    dtype = next((p.dtype for p in model.base_model.parameters() if p.is_floating_point() and not p.is_meta), None)
    with recording(model, names, respond=lambda layer, args, kwargs: _hidden(args, kwargs)) as calls:
        for sample in samples:
            calls.clear()
            inputs = {k: _input(v, acts.device, dtype) for k, v in sample.items()}
            model.base_model(**inputs, use_cache=False)
            if len(calls) != len(names):
                raise RuntimeError(f"expected {len(names)} decoder layer calls, saw {len(calls)}")
            if any(len(args) > 1 for args, _ in calls):
                raise TypeError("decoder layers called with positional arguments besides hidden states are not supported")
            acts.add(_hidden(*calls[0]).detach(), [{k: v for k, v in kw.items() if k != "hidden_states"} for _, kw in calls],
                     modality_labels(sample["input_ids"][0], token_ids))
            if progress is not None:
                progress()
    return acts


def _hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden states a decoder layer is called with (first positional, or by keyword)."""
    return args[0] if args else kwargs["hidden_states"]


def _input(value: Any, device: torch.device, dtype: torch.dtype | None) -> Any:
    """A model input on ``device``; floating inputs (pixel values, audio features) in the model's dtype."""
    if not isinstance(value, torch.Tensor):
        return value
    if value.is_floating_point() and dtype is not None:
        return value.to(device=device, dtype=dtype)
    return value.to(device)
