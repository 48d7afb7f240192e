"""The sequential driver, one decoder layer at a time (DESIGN.md §3).

- profile (dense): export -> instrument -> run -> statistics of every linear (diversities,
  input norms for OWL); the dense outputs move on to the next layer.
- prune: export -> instrument -> run -> plan -> rewrite -> run again, so each layer is
  planned on the pruned outputs of the one before (as Wanda and SparseGPT do);
  with ``sequential="groups"`` (statistics of a linear's inputs alone) in one pass instead:
  the layer runs a stage at a time (:mod:`tamp_fx.capture.stages`) and each group of linears
  that read one tensor is planned and rewritten before the stage that runs it, so later groups
  are planned on the outputs of the pruned ones before them.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from tamp_fx.allocate.strategies import LayerProfile
from tamp_fx.capture.activations import Activations
from tamp_fx.capture.graph import LayerExporter, LinearInfo, analyse_linears, drop_tensors, is_linear, weight_name
from tamp_fx.capture.layers import DecoderLayers
from tamp_fx.capture.stages import Stages
from tamp_fx.config import PlanConfig
from tamp_fx.errors import TampError, first_line
from tamp_fx.modality import Modality
from tamp_fx.passes.instrument import InstrumentConfig, instrument
from tamp_fx.passes.plan import LinearDecision, PlanPassConfig
from tamp_fx.passes.plan import plan as plan_pass
from tamp_fx.passes.rewrite import apply_decision, rewrite
from tamp_fx.prune.masks import KeptValues, PackedMask
from tamp_fx.prune.scores import SCORES
from tamp_fx.runtime.distributed import guarded, sample_indices
from tamp_fx.runtime.memory import PeakMemory, describe, trim_host_heap
from tamp_fx.runtime.progress import Bars
from tamp_fx.runtime.timing import FORWARD, PRUNING, STATISTICS, TRACE, stage
from tamp_fx.statistics.atv import LayerChange
from tamp_fx.statistics.observers import LinearObserver, ObserverContext, reduce_statistics
from tamp_fx.statistics.tokens import TOKEN_SELECTIONS

log = logging.getLogger(__name__)

#: the phases' progress tasks (:class:`~tamp_fx.runtime.progress.Bars`)
PROFILE, PRUNE = "profile", "prune"


def prune_cost(config: PlanConfig) -> float:
    """What pruning one layer is expected to cost, in passes of the calibration samples through it
    (the unit of the plan's ETA): ATV's change measure, calibration and propagation when the score
    reads activations, and the decision itself (SparseGPT's column sweeps about a pass)."""
    score, selection = SCORES[config.score], TOKEN_SELECTIONS[config.tokens]
    passes = (1 if config.sequential == "groups" else 2 + int(selection.needs_layer_change)) if score.needs_activations else 0
    return passes + (1.0 if score.needs_hessian else 0.2)


@dataclass(frozen=True)
class LayerResult:
    index: int
    decisions: dict[str, LinearDecision]       # weight name relative to the layer -> decision, mask a PackedMask,
                                               # new weight KeptValues (:func:`_on_host`)
    linears: dict[str, LinearInfo]
    stats: dict[str, Any]


def _forward(run: Callable[[], Any], layer: int, sample: int) -> Any:
    """``run()``, a decoder layer's forward on one calibration sample; its failure in one line."""
    try:
        with stage(FORWARD):
            return run()
    except TampError:
        raise
    except Exception as error:  # noqa: BLE001
        raise TampError(f"decoder layer {layer} failed on calibration sample {sample}: {first_line(error)}") from error


def _run_samples(gm: torch.nn.Module, acts: Activations, layer: int, context: ObserverContext,
                 observed: Mapping[str, Any] | None, bars: Bars, description: str, keep_outputs: bool,
                 change: LayerChange | None = None) -> None:
    """Run every sample of this rank through ``gm``; observers finish each sample; with
    ``keep_outputs`` the outputs become the next layer's inputs; ``change`` records how the
    layer changed each token."""
    linear_observers = list(observed["linear"].values()) if observed else []
    attention_observers = observed["attention"] if observed else []
    with bars.task(description, len(acts)) as advance, torch.no_grad():
        for j, sample in enumerate(sample_indices(len(acts))):
            hidden, kwargs = acts.inputs(j, layer)
            context.labels, context.sample = acts.labels[j].to(acts.device), sample
            out = _forward(lambda: gm(hidden, **kwargs), layer, sample)
            attention = attention_observers[0].current if attention_observers else None
            out = out[0] if isinstance(out, tuple) else out
            with stage(STATISTICS):
                for observer in linear_observers:
                    observer.finish_sample(attention)
                if change is not None:
                    change.add(sample, context.labels, hidden, out)
            if keep_outputs:
                acts.set_hidden(j, out)
            advance()


def decide_linears(gm: torch.fx.GraphModule, config: PlanConfig, targets: Mapping[str, float],
                   observers: Mapping[str, LinearObserver], names: list[str] | None = None) -> dict[str, LinearDecision]:
    """The plan pass's decisions for the linears ``names`` (None: all of the layer's)."""
    chosen = targets if names is None else {w: targets[w] for w in names}
    return plan_pass(gm, PlanPassConfig(config.score, chosen, observers, config.nm)).info["decisions"]


def _prune_layer(gm: torch.fx.GraphModule, acts: Activations, layer: int, context: ObserverContext,
                 decide: Callable[..., dict[str, LinearDecision]], bars: Bars, keep_outputs: bool) -> dict[str, LinearDecision]:
    """Every linear of the layer planned and rewritten at once; with ``keep_outputs`` every
    sample then runs through the pruned layer into the next layer's inputs."""
    with guarded():      # the same decisions on every rank, then each propagates its samples
        with stage(PRUNING):
            decisions = {w: _on_host(d) for w, d in decide().items()}
            rewrite(gm)
        if keep_outputs:
            _run_samples(gm, acts, layer, context, None, bars, f"layer {layer}: propagate", keep_outputs=True)
    return decisions


def prune_in_stages(gm: torch.fx.GraphModule, acts: Activations, layer: int, context: ObserverContext,
                    observed: Mapping[str, Any], decide: Callable[[list[str]], dict[str, LinearDecision]],
                    bars: Bars, keep_outputs: bool) -> dict[str, LinearDecision]:
    """One pass through the layer: every sample runs up to a group of linears, the group is
    planned (``decide(weight names)``) and rewritten, then every sample runs on to the next.
    With ``keep_outputs`` the outputs become the next layer's inputs."""
    stages = Stages(gm)
    linears = {weight_name(n): n for n in gm.graph.nodes if is_linear(n)}
    n_stages = len(stages) if keep_outputs else len(stages) - 1    # the last layer's outputs are not needed
    envs: list[Any] = [None] * len(acts)       # per sample: the values later stages still need
    decisions: dict[str, LinearDecision] = {}
    with bars.task(f"layer {layer}: calibrate", len(acts) * n_stages) as advance, torch.no_grad():
        for k in range(n_stages):
            with guarded():
                for j, sample in enumerate(sample_indices(len(acts))):
                    context.labels, context.sample = acts.labels[j].to(acts.device), sample
                    if k == 0:
                        hidden, kwargs = acts.inputs(j, layer)
                        env = stages.start((hidden,), kwargs)
                        del hidden             # the env holds the inputs as long as a stage reads them
                        if keep_outputs:
                            acts.release_hidden(j)
                    else:
                        env = acts.unstash(envs[j])
                    out = _forward(lambda: stages.run(env, k), layer, sample)
                    if k + 1 < len(stages):
                        envs[j] = acts.stash(env)
                    else:
                        envs[j] = None
                        acts.set_hidden(j, out[0] if isinstance(out, tuple) else out)
                    advance()
            if k < len(stages.groups):
                group = stages.groups[k]
                _reduce([observed["linear"][w] for w in group])
                with guarded(), stage(PRUNING):
                    for w, decision in decide(group).items():
                        apply_decision(gm, linears[w])
                        decisions[w] = _on_host(decision)
            trim_host_heap()       # the stage's values lie among its forwards' freed temporaries: give those pages back
    _reduce(observed["attention"])
    return decisions


def _check_pattern(gm: torch.nn.Module, linears: Mapping[str, LinearInfo], config: PlanConfig, prefix: str) -> None:
    """An N:M pattern needs every linear's input width to be a multiple of M: say which is not."""
    if config.nm is None:
        return
    m = config.nm[1]
    for w in linears:
        c_in = gm.get_parameter(w).shape[1]
        if c_in % m:
            raise TampError(f"pattern {config.pattern} needs input widths that are multiples of {m}, "
                            f"but {prefix}.{w} has {c_in} input columns")


def _reduce(observers: Iterable[Any]) -> None:
    """Every rank's statistics of these observers summed over all samples (one process: unchanged)."""
    with stage(STATISTICS):
        reduce_statistics(observers)


def _every_observer(observed: Mapping[str, Any]) -> list[Any]:
    """The instrument pass's observers of a layer, linear and attention."""
    return [*observed["linear"].values(), *observed["attention"]]


def _attention_stats(observed: Mapping[str, Any]) -> dict[str, Any]:
    attention = observed["attention"]
    if not attention or not attention[0].samples:
        return {}
    mass = (sum(o.mass_per_modality for o in attention) / sum(o.samples for o in attention)).tolist()
    return {"last_token_attention_per_modality": {m.name.lower(): round(float(mass[m]), 6) for m in Modality}}


def _graph(exporter: LayerExporter, layers: DecoderLayers, layer: torch.nn.Module, acts: Activations, index: int,
           config: PlanConfig) -> tuple[torch.fx.GraphModule, dict[str, LinearInfo]]:
    """The layer's graph (traced on sample 0) and what it says about the linears."""
    hidden, kwargs = acts.inputs(0, index)
    with stage(TRACE):
        gm = exporter(layer, (hidden,), kwargs)
        linears = analyse_linears(gm)
    _check_pattern(gm, linears, config, layers.prefix(index))
    return gm, linears


def _on_host(decision: LinearDecision) -> LinearDecision:
    """The decision kept after its layer is released: mask bit-packed in host memory
    (:class:`~tamp_fx.prune.masks.PackedMask`, 1 bit per weight), new weights as their kept values
    (:class:`~tamp_fx.prune.masks.KeptValues`) moved to a temporary file: a SparseGPT plan's weights
    would otherwise be the largest thing a plan holds and grow with the model (212 MB of SmolLM2's
    270 MB in bfloat16; ~7 GB at 8B). Where the file cannot be written they stay in memory, with a warning."""
    new_weight = None if decision.new_weight is None else _spilled(KeptValues.of(decision.new_weight, decision.mask))
    return dataclasses.replace(decision, mask=PackedMask.of(decision.mask), new_weight=new_weight)


_SPILL_FAILED: list[str] = []       # the first reason spilling failed in this process (warned once)


def _spilled(kept: KeptValues) -> KeptValues:
    try:
        return kept.spilled()
    except OSError as error:
        if not _SPILL_FAILED:
            _SPILL_FAILED.append(first_line(error))
            log.warning("could not write reconstructed weights to the temporary directory %s (%s): they stay in "
                        "memory; set TMPDIR to a directory with room for about half the model", tempfile.gettempdir(),
                        _SPILL_FAILED[0])
        return kept


def profile_layers(layers: DecoderLayers, acts: Activations, config: PlanConfig, bars: Bars,
                   exporter: LayerExporter) -> list[LayerProfile]:
    """Run the dense model layer by layer and collect what the allocation needs.
    ``acts.hidden`` ends at the last layer's input; callers keep a copy of the start."""
    diversity = config.allocation.startswith("das")
    observer_factory = functools.partial(LinearObserver, track_diversity=diversity,
                                         all_tokens_one_modality=config.allocation == "das-alltoken",
                                         collect_inputs=not diversity)  # OWL reads input norms, DAS only diversities
    profiles = []
    with bars.task(PROFILE, len(layers), item="layer") as advance_layer:
        for i in range(len(layers)):
            peak = PeakMemory(acts.device)
            with layers.open(i) as layer:
                with guarded():      # each rank on its samples; then all learn whether any failed
                    gm, linears = _graph(exporter, layers, layer, acts, i, config)
                    context = ObserverContext()
                    observed = instrument(gm, InstrumentConfig(context, observer_factory)).info
                    _run_samples(gm, acts, i, context, observed, bars, f"layer {i}: profile", keep_outputs=i + 1 < len(layers))
                _reduce(_every_observer(observed))
                sizes = {w: gm.get_parameter(w).numel() for w in linears}
                profile = LayerProfile(i, linears, sizes)
                obs = observed["linear"]
                if diversity:
                    profile.importance = {w: obs[w].importance() for w in linears}
                    profile.diversity = {w: obs[w].diversity() for w in linears}
                if config.allocation == "owl":
                    scores = torch.cat([(gm.get_parameter(w).detach().float().abs()
                                         * obs[w].stats.input_norm().to(acts.device)[None, :]).flatten()
                                        for w in linears])                  # (sum P_g,)
                    profile.outlier_ratio = float((scores > config.owl_m * scores.mean()).float().mean())
                profiles.append(profile)
                drop_tensors(gm)
            advance_layer(note=describe(peak.read()))
    return profiles


def layer_structure(layers: DecoderLayers, acts: Activations, config: PlanConfig, exporter: LayerExporter) -> list[LayerProfile]:
    """What the graphs say about every layer's linears, without running any sample."""
    profiles = []
    for i in range(len(layers)):
        with layers.open(i) as layer:
            gm, linears = _graph(exporter, layers, layer, acts, i, config)
            profiles.append(LayerProfile(i, linears, {w: gm.get_parameter(w).numel() for w in linears}))
            drop_tensors(gm)
    return profiles


def prune_layers(layers: DecoderLayers, acts: Activations, config: PlanConfig, targets: Callable[[int, dict], dict[str, float]],
                 bars: Bars, exporter: LayerExporter) -> list[LayerResult]:
    """Plan every decoder layer in order; ``acts.hidden`` is advanced through the pruned layers.
    ``targets(layer_index, linears)`` gives each linear's target sparsity."""
    score = SCORES[config.score]
    selection = TOKEN_SELECTIONS[config.tokens]
    selector = selection.selector(config) if score.needs_activations else None
    measure_change = score.needs_activations and selection.needs_layer_change
    observer_factory = functools.partial(LinearObserver, selector=selector, hessian=score.needs_hessian)
    results = []
    n_layers = len(layers)
    with bars.task(PRUNE, n_layers, item="layer") as advance_layer:
        for i in range(n_layers):
            start, peak = time.perf_counter(), PeakMemory(acts.device)
            with layers.open(i) as layer:
                with guarded():      # each rank on its samples; then all learn whether any failed
                    gm, linears = _graph(exporter, layers, layer, acts, i, config)
                    context = ObserverContext()
                    if measure_change:    # before the observers go in: ATV selects on the whole layer's change
                        context.layer_change = LayerChange()
                        _run_samples(gm, acts, i, context, None, bars, f"layer {i}: measure change", keep_outputs=False,
                                     change=context.layer_change)
                if measure_change:
                    reduce_statistics([context.layer_change])
                with guarded():
                    observed = instrument(gm, InstrumentConfig(context, observer_factory)).info
                decide = functools.partial(decide_linears, gm, config, targets(i, linears), observed["linear"])
                keep_outputs = score.needs_activations and i + 1 < n_layers
                if score.needs_activations and config.sequential == "groups":
                    decisions = prune_in_stages(gm, acts, i, context, observed, decide, bars, keep_outputs)
                else:
                    if score.needs_activations:   # every sample through the dense, instrumented layer
                        with guarded():
                            _run_samples(gm, acts, i, context, observed, bars, f"layer {i}: calibrate", keep_outputs=False)
                        _reduce(_every_observer(observed))
                    decisions = _prune_layer(gm, acts, i, context, decide, bars, keep_outputs)
                stats = {"seconds": round(time.perf_counter() - start, 3), **peak.read(), **_attention_stats(observed)}
                results.append(LayerResult(i, decisions, linears, stats))
                drop_tensors(gm)
                del gm, observed, decide      # the observers' statistics go now, before the heap is trimmed
            advance_layer(note=describe(stats))
    log.info("%d decoder layers planned from %d torch.export trace(s)", n_layers, exporter.exports)
    return results
