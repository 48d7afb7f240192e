"""The sequential driver: one decoder layer at a time, export -> instrument -> run ->
plan -> rewrite -> run again, so each layer is planned on the pruned outputs of the one
before (as Wanda and SparseGPT do)."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch

from tamp_fx.passes.instrument import InstrumentConfig, instrument
from tamp_fx.passes.plan import LinearDecision, PlanPassConfig
from tamp_fx.passes.plan import plan as plan_pass
from tamp_fx.passes.rewrite import rewrite
from tamp_fx.adapters import DecoderLayout
from tamp_fx.capture import Activations
from tamp_fx.config import PlanConfig
from tamp_fx.errors import TampError
from tamp_fx.graph import LayerExporter, LinearInfo, analyse_linears
from tamp_fx.modality import Modality
from tamp_fx.observers import ObserverContext
from tamp_fx.progress import Bars
from tamp_fx.scores import SCORES

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerResult:
    index: int
    decisions: dict[str, LinearDecision]       # weight name relative to the layer -> decision
    linears: dict[str, LinearInfo]
    stats: dict[str, Any]


def _run_samples(gm: torch.nn.Module, acts: Activations, layer: int, context: ObserverContext | None,
                 bars: Bars, description: str, keep_outputs: bool) -> None:
    with bars.task(description, len(acts)) as advance, torch.no_grad():
        for j in range(len(acts)):
            if context is not None:
                context.labels = acts.labels[j]
            try:
                out = gm(acts.hidden[j], **acts.layer_kwargs[j][layer])
            except Exception as error:  # noqa: BLE001
                raise TampError(f"decoder layer {layer} failed on calibration sample {j}: {str(error).splitlines()[0]}") from error
            if keep_outputs:
                acts.hidden[j] = out[0] if isinstance(out, tuple) else out
            advance()


def prune_layers(layout: DecoderLayout, acts: Activations, config: PlanConfig, bars: Bars) -> list[LayerResult]:
    """Plan every decoder layer in order; ``acts.hidden`` is advanced through the pruned layers."""
    score = SCORES[config.score]
    results = []
    n_layers = len(layout.layers)
    export_layer = LayerExporter()
    with bars.task("layers", n_layers) as advance_layer:
        for i in range(n_layers):
            start = time.perf_counter()
            gm = export_layer(layout.layers[i], (acts.hidden[0],), acts.layer_kwargs[0][i])
            linears = analyse_linears(gm)
            context = ObserverContext()
            observed = instrument(gm, InstrumentConfig(context)).info
            if score.needs_activations:
                _run_samples(gm, acts, i, context, bars, f"layer {i}: calibrate", keep_outputs=False)
            targets = {name: config.sparsity for name in linears}
            decisions = plan_pass(gm, PlanPassConfig(config.score, targets, observed["linear"])).info["decisions"]
            rewrite(gm)
            if score.needs_activations and i + 1 < n_layers:
                _run_samples(gm, acts, i, None, bars, f"layer {i}: propagate", keep_outputs=True)
            stats = {"seconds": round(time.perf_counter() - start, 3)}
            attention = observed["attention"]
            if attention and score.needs_activations:
                mass = sum(o.mass_per_modality for o in attention) / max(1, len(acts) * len(attention))
                stats["last_token_attention_per_modality"] = {m.name.lower(): round(float(mass[m]), 6) for m in Modality}
            results.append(LayerResult(i, decisions, linears, stats))
            del gm
            advance_layer()
    log.info("%d decoder layers planned from %d torch.export trace(s)", n_layers, export_layer.exports)
    return results
