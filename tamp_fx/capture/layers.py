"""Decoder layers as the driver sees them: layer ``i`` as a module on the compute device, released after.

The driver (:mod:`tamp_fx.pipeline.sequential`) plans any source through :class:`DecoderLayers`:

* :class:`ResidentLayers`: a model loaded whole (a GGUF, or ``layer_by_layer=False``), already
  on the device; opening a layer hands it out as it is.
* :class:`CheckpointLayers`: a model built on the meta device; opening layer ``i`` reads its
  tensors from the safetensors shards onto the device, closing it returns them to the meta
  device, so memory holds one decoder layer whatever the depth of the model.

Another source (an exported program's decoder layers) plugs in by implementing the protocol.
Every implementation keeps :attr:`fingerprints`: a sample of each 2-D weight as stored (before
any cast to the compute dtype), keyed by in-memory name, for the plan's model fingerprint.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Protocol

import torch

from tamp_fx.load.adapters import DecoderLayout
from tamp_fx.load.checkpoint import CheckpointIndex, materialise, release
from tamp_fx.load.fingerprint import FingerprintSample, fingerprint_sample
from tamp_fx.runtime.memory import release_memory
from tamp_fx.runtime.timing import LOAD, stage


class DecoderLayers(Protocol):
    device: torch.device
    dtype: torch.dtype                            # of the forward passes (plan.json's timing records both)
    fingerprints: dict[str, FingerprintSample]   # in-memory weight name -> sample of its stored values

    def __len__(self) -> int: ...

    def prefix(self, index: int) -> str:
        """In-memory name of layer ``index`` (``model.language_model.layers.3``)."""
        ...

    def open(self, index: int) -> contextlib.AbstractContextManager[torch.nn.Module]:
        """Layer ``index`` on :attr:`device` in the compute dtype, for the duration of the block."""
        ...


def _weights(module: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{n}": p for n, p in module.named_parameters() if p.dim() == 2}


class _LayoutLayers:
    """Length and names from the model's :class:`DecoderLayout`."""

    layout: DecoderLayout

    def __len__(self) -> int:
        return len(self.layout.layers)

    def prefix(self, index: int) -> str:
        return self.layout.layer_prefix(index)


class ResidentLayers(_LayoutLayers):
    """The decoder layers of a ``model`` held whole in memory. The model is moved to ``device``
    with its parameters in ``dtype`` (buffers such as rotary frequencies keep theirs), after
    the fingerprint samples are taken."""

    def __init__(self, model: torch.nn.Module, layout: DecoderLayout, device: torch.device, dtype: torch.dtype) -> None:
        self.layout, self.device, self.dtype = layout, device, dtype
        self.fingerprints = {n: fingerprint_sample(w) for i in range(len(self))
                             for n, w in _weights(layout.layers[i], layout.layer_prefix(i)).items()}
        model.to(device)
        for p in model.parameters():
            if p.is_floating_point():
                p.data = p.data.to(dtype)

    @contextlib.contextmanager
    def open(self, index: int) -> Iterator[torch.nn.Module]:
        try:
            yield self.layout.layers[index]
        finally:
            release_memory(self.device)


class CheckpointLayers(_LayoutLayers):
    """The decoder layers of a meta-device ``model``, read from the checkpoint one at a time."""

    def __init__(self, model: torch.nn.Module, layout: DecoderLayout, index: CheckpointIndex,
                 device: torch.device, dtype: torch.dtype, *, allow_nonfinite: bool = False) -> None:
        """``index`` holds every tensor of the layers (:func:`tamp_fx.load.validate.check_checkpoint`);
        a tensor holding NaN or inf is refused as its layer is read, unless ``allow_nonfinite``."""
        self.model, self.layout, self.index, self.device, self.dtype = model, layout, index, device, dtype
        self.allow_nonfinite = allow_nonfinite
        self.fingerprints: dict[str, FingerprintSample] = {}
        names = [n for n in model.state_dict() if n.startswith(layout.prefix + ".") and n in index.entries]
        self._names = [[n for n in names if n.startswith(layout.layer_prefix(i) + ".")] for i in range(len(self))]

    @contextlib.contextmanager
    def open(self, index: int) -> Iterator[torch.nn.Module]:
        with stage(LOAD):
            stored = self.index.read(self._names[index], self.dtype, self.fingerprints,
                                     allow_nonfinite=self.allow_nonfinite)
            materialise(self.model, stored, self.dtype, self.device, within=self.prefix(index))
            del stored
        layer = self.layout.layers[index]
        try:
            yield layer
        finally:
            with stage(LOAD):
                release(layer)
                release_memory(self.device)
