"""Capture what the decoder layers are called with: run the model with every decoder layer
swapped for a pass-through that records its call, so no exception stops the forward."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from tamp_fx.adapters import DecoderLayout
from tamp_fx.modality import modality_labels


@dataclass
class Activations:
    """Per calibration sample: the hidden states entering the current layer, the keyword
    arguments each layer is called with, and the modality label of every token."""

    hidden: list[torch.Tensor] = field(default_factory=list)              # per sample (1, N, C)
    layer_kwargs: list[list[dict[str, Any]]] = field(default_factory=list)  # [sample][layer]
    labels: list[torch.Tensor] = field(default_factory=list)              # per sample (N,) int8

    def __len__(self) -> int:
        return len(self.hidden)


class _Recorder(torch.nn.Module):
    """Stands in for a decoder layer: records its call and passes hidden states through."""

    def __init__(self, calls: list) -> None:
        super().__init__()
        self.calls = calls

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args:
            raise TypeError("decoder layers called with positional arguments besides hidden states are not supported")
        self.calls.append((hidden_states, kwargs))
        return hidden_states


@torch.no_grad()
def capture_layer_inputs(model: torch.nn.Module, layout: DecoderLayout, samples: list[dict[str, torch.Tensor]],
                         token_ids, progress=None) -> Activations:
    """Run ``model.base_model`` (no LM head) on every sample and record each decoder layer's
    call. The model's layers are restored afterwards, whatever happens."""
    original = list(layout.layers)
    calls: list[tuple[torch.Tensor, dict[str, Any]]] = []
    device = next(model.parameters()).device
    acts = Activations()
    try:
        for i in range(len(original)):
            layout.layers[i] = _Recorder(calls)
        for sample in samples:
            calls.clear()
            inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in sample.items()}
            model.base_model(**inputs, use_cache=False)
            if len(calls) != len(original):
                raise RuntimeError(f"expected {len(original)} decoder layer calls, saw {len(calls)}")
            acts.hidden.append(calls[0][0].detach())
            acts.layer_kwargs.append([kw for _, kw in calls])
            acts.labels.append(modality_labels(sample["input_ids"][0], token_ids))
            if progress is not None:
                progress()
    finally:
        for i, layer in enumerate(original):
            layout.layers[i] = layer
    return acts
