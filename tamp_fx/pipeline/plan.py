"""``plan`` end to end: open the model (whole, or layer by layer from its checkpoint), capture
the decoder's inputs, allocate on the dense model, prune layer by layer (:mod:`tamp_fx.pipeline.sequential`)
and assemble the :class:`~tamp_fx.artifact.plan.Plan`. A Hugging Face model, a GGUF file and an exported
program go through the same loop."""
from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from pathlib import Path

import torch

from tamp_fx.allocate.ecoflap import ZEROTH_ORDER, lm_loss, program_loss, zeroth_order_block_importance
from tamp_fx.allocate.strategies import ALLOCATORS, Allocation
from tamp_fx.artifact.plan import LinearPlan, Plan
from tamp_fx.calibrate.program import load_program_calibration, program_calibration_file
from tamp_fx.calibrate.samples import calibration_inputs, load_calibration
from tamp_fx.capture.activations import Activations, capture_layer_inputs
from tamp_fx.capture.graph import LayerExporter
from tamp_fx.capture.layers import CheckpointLayers, DecoderLayers, ResidentLayers
from tamp_fx.capture.program import ProgramLayerExporter, ProgramLayers, capture_program_inputs, program_layout
from tamp_fx.config import PlanConfig
from tamp_fx.errors import TampError
from tamp_fx.load.adapters import decoder_layout, modality_token_ids
from tamp_fx.load.checkpoint import checkpoint_dtype, checkpoint_index, materialise, meta_model, release
from tamp_fx.load.fingerprint import fingerprint_of
from tamp_fx.load.program import load_program
from tamp_fx.load.source import ModelSource, load_processor, resolve_source
from tamp_fx.load.validate import check_checkpoint, check_program, load_checked
from tamp_fx.pipeline.sequential import (
    PROFILE,
    PRUNE,
    LayerResult,
    layer_structure,
    profile_layers,
    prune_cost,
    prune_layers,
)
from tamp_fx.runtime import distributed
from tamp_fx.runtime.memory import process_peak_mib
from tamp_fx.runtime.placement import check_dtype, resolve_device, resolve_dtype
from tamp_fx.runtime.progress import Bars
from tamp_fx.runtime.timing import ALLOCATION, Stopwatch, stage

log = logging.getLogger(__name__)

CAPTURE = "capture decoder inputs"          # a phase's progress task (:class:`~tamp_fx.runtime.progress.Bars`)


def plan(model: str | Path | ModelSource, calib: str | Path, config: PlanConfig = PlanConfig(), *,
         progress: bool | Bars = False,
         device: str | torch.device | None = None, dtype: str | None = None, offload_activations: bool = False,
         layer_by_layer: bool | None = None, allow_nonfinite: bool = False) -> Plan:
    """Calibrate on ``calib`` and decide a keep-mask for every linear of the language decoder.

    A Hugging Face / GGUF model and an exported program (``.pt2``) go through the same
    layer-by-layer driver: capture the inputs of the first decoder layer, then profile,
    allocate and prune layer by layer (:mod:`tamp_fx.pipeline.sequential`, over :class:`tamp_fx.capture.layers.DecoderLayers`).

    Where it runs is no part of the plan (:mod:`tamp_fx.runtime.placement`): ``device`` (``"cpu"``,
    ``"cuda"``, ``"cuda:N"``; None: CUDA when available), ``dtype`` of the forward passes
    (``"auto"`` = the checkpoint's, ``"float32"``, ``"bfloat16"``, ``"float16"``; None: bfloat16
    where the device computes it natively, else float32 on the CPU and auto on CUDA; see
    :mod:`tamp_fx.runtime.placement`; the plan's ``timing`` records what ran), ``offload_activations`` (keep the calibration activations in host
    memory and move them to ``device`` a sample at a time). ``layer_by_layer`` (None: yes for a
    Hugging Face directory) builds the model on the meta device, materialises only what computes
    the decoder's inputs, and reads each decoder layer from the checkpoint when it is planned; a
    GGUF file and ECoFLaP's allocation (a loss over the whole model) load the model whole.
    An exported program is planned on the CPU, as stored.

    The model is checked before any work (:mod:`tamp_fx.load.validate`): a tensor missing, of
    another shape than the config gives or of a dtype tamp-fx does not compute with is refused in
    one line, and so is one holding NaN or inf (as it is read) unless ``allow_nonfinite``.

    ``progress``: bars on stderr, or the caller's :class:`~tamp_fx.runtime.progress.Bars`, whose ETA then
    covers what it declared too (the command line: writing the plan); off by default.
    The plan records how long this took (``Plan.timing``: the wall time and its parts).

    Nothing is written: save the result with ``Plan.save``.

    Under ``torchrun`` every rank plans on its share of the samples (:mod:`tamp_fx.runtime.distributed`)
    and returns the same plan; save it on rank 0.
    """
    clock = Stopwatch()
    with clock.running():          # the stages of the run charge it (plan.json's timing)
        return _plan(model, calib, config, progress, device, dtype, offload_activations, layer_by_layer, allow_nonfinite,
                     clock)


def _plan(model: str | Path | ModelSource, calib: str | Path, config: PlanConfig, progress: bool | Bars,
          device: str | torch.device | None, dtype: str | None, offload_activations: bool, layer_by_layer: bool | None,
          allow_nonfinite: bool, clock: Stopwatch) -> Plan:
    world = distributed.init_from_env()              # under torchrun: cuda:LOCAL_RANK is the current device
    with distributed.guarded():
        source = resolve_source(model)
        if source.kind == "pt2" and world.distributed:
            raise TampError("an exported program (.pt2) is planned in one process: run `tamp-fx plan` without torchrun")
        if source.kind == "pt2":
            if device is not None and torch.device(device).type != "cpu" or dtype not in (None, "auto"):
                raise TampError("an exported program (.pt2) is planned on the CPU in its own dtype: drop --device and --dtype")
            return _plan_program(source, calib, config, _bars(progress, world.rank), clock, allow_nonfinite)
        target = resolve_device(device)
        if world.distributed and target.type == "cuda" and target != world.device:
            raise TampError(f"under torchrun rank {world.rank} computes on {world.device}, not {target}: "
                            "pass --device cuda (each rank takes cuda:LOCAL_RANK)")
        check_dtype(dtype)
        whole_only = source.kind == "gguf" or ALLOCATORS[config.allocation].needs_zeroth_order
        if layer_by_layer and whole_only:
            raise TampError(f"layer-by-layer loading needs a Hugging Face directory and an allocation other than ecoflap "
                            f"({source.path.name}, {config.allocation}): load the model whole")
        layer_by_layer = not whole_only if layer_by_layer is None else layer_by_layer
        opener = open_layer_by_layer if layer_by_layer else open_whole
        net, layout, layers = opener(source, target, dtype, allow_nonfinite=allow_nonfinite)
        processor = load_processor(source, net.config)
        token_ids = modality_token_ids(net.config)
        samples = load_calibration(calib, processor, nsamples=config.nsamples, seqlen=config.seqlen, seed=config.seed,
                                   shard=(world.rank, world.size))
    n_samples = distributed.total_count(len(samples))
    with distributed.guarded():
        if n_samples < world.size:
            raise TampError(f"{n_samples} calibration sample(s) for {world.size} processes: every process needs one; "
                            "use more samples or fewer processes")
    log.info("%s: %d decoder layers (%s), %d calibration samples", source.path.name, len(layers),
             "read layer by layer" if layer_by_layer else "loaded whole", n_samples)
    clock.lap("load")
    with _bars(progress, world.rank) as bars:
        _expect(bars, config, len(layers))
        with distributed.guarded(), bars.task(CAPTURE, len(samples)) as advance:
            acts = capture_layer_inputs(net, layout, samples, token_ids, advance, device=target,
                                        offload=offload_activations)
        clock.lap("capture")
        if layer_by_layer:
            release(net)                              # the capture parts are done with: keep one layer at a time
        zeroth_order = None
        if ALLOCATORS[config.allocation].needs_zeroth_order:
            zeroth_order = functools.partial(zeroth_order_block_importance, dict(net.named_parameters()), samples,
                                             lm_loss(net, token_ids))
        results, allocation = _plan_layers(layers, acts, config, bars, LayerExporter(), zeroth_order, clock)
    index = checkpoint_index(source, net)
    model_info = {
        "model_type": net.config.model_type,
        "architecture": type(net).__name__,
        "source": source.path.name,
        "decoder": layout.prefix,
        "num_layers": len(layout.layers),
        "modality_token_ids": {m.name.lower(): i for m, i in token_ids.items()},
        "untouched": list(layout.untouched),
        "calibration": {"file": Path(calib).name, "samples": n_samples},
    }
    return _assemble(config, model_info, layers, results, allocation, index.key, clock)


def _bars(progress: bool | Bars, rank: int) -> Bars:
    """The caller's bars, or bars of the plan alone (on rank 0 only)."""
    return progress if isinstance(progress, Bars) else Bars(progress and rank == 0)


def _expect(bars: Bars, config: PlanConfig, n_layers: int) -> None:
    """Declare the plan's phases, each's cost in passes of the calibration samples through one decoder
    layer, so that the ETA covers them all (capturing the inputs: about one pass)."""
    allocator = ALLOCATORS[config.allocation]
    bars.expect(CAPTURE, 1.0)
    if allocator.needs_profile:
        bars.expect(PROFILE, n_layers)
    if allocator.needs_zeroth_order:
        bars.expect(ZEROTH_ORDER, 2.0 * n_layers)     # two forward passes of the whole model per sample
    bars.expect(PRUNE, n_layers * prune_cost(config))


def _plan_program(source: ModelSource, calib: str | Path, config: PlanConfig, bars: Bars, clock: Stopwatch,
                  allow_nonfinite: bool) -> Plan:
    """Plan an exported program: its decoder layers found by structure (:mod:`tamp_fx.capture.program`)."""
    ep = load_program(source.path)
    check_program(ep, source.path, allow_nonfinite=allow_nonfinite)
    samples = load_program_calibration(calib, config.nsamples)
    layout = program_layout(ep, str(source.path))
    clock.lap("load")
    with bars:
        _expect(bars, config, len(layout.layers))
        with bars.task(CAPTURE, len(samples)) as advance:
            acts = capture_program_inputs(layout, samples, advance)
        clock.lap("capture")
        zeroth_order = None
        if ALLOCATORS[config.allocation].needs_zeroth_order:
            gm = ep.module()
            zeroth_order = functools.partial(zeroth_order_block_importance, dict(gm.named_parameters()), samples,
                                             program_loss(gm, samples))
        results, allocation = _plan_layers(ProgramLayers(layout), acts, config, bars, ProgramLayerExporter(),
                                           zeroth_order, clock)
    model_info = {
        "model_type": "exported_program",
        "architecture": "ExportedProgram",
        "source": source.path.name,
        "decoder": layout.prefix,
        "num_layers": len(layout.layers),
        "modality_token_ids": {},
        "untouched": [],
        "calibration": {"file": Path(calib).name, "samples": len(samples)},
    }
    return _assemble(config, model_info, ProgramLayers(layout), results, allocation, lambda name: name, clock)


def _plan_layers(layers: DecoderLayers, acts: Activations, config: PlanConfig, bars: Bars, exporter,
                 zeroth_order: Callable | None, clock: Stopwatch) -> tuple[list[LayerResult], Allocation | None]:
    """The sequential driver over ``layers``: allocate on the dense model, then prune."""
    allocation = _allocate(layers, acts, config, bars, exporter, zeroth_order)
    if ALLOCATORS[config.allocation].strategy is not None:
        clock.lap("profile")
    targets = ((lambda i, linears: {w: config.sparsity for w in linears}) if allocation is None
               else (lambda i, linears: {w: allocation.targets[(i, w)] for w in linears}))
    results = prune_layers(layers, acts, config, targets, bars, exporter)
    clock.lap("prune")
    return results, allocation


def _assemble(config: PlanConfig, model_info: dict, layers: DecoderLayers, results: list[LayerResult],
              allocation: Allocation | None, key: Callable[[str], str], clock: Stopwatch) -> Plan:
    """The plan of the driver's results; ``key`` maps an in-memory parameter name to its plan key;
    ``clock`` timed the run since :func:`plan` began."""
    linears, masks, weights, fingerprints = {}, {}, {}, {}
    for result in results:
        for w, d in result.decisions.items():
            mem_name = f"{layers.prefix(result.index)}.{w}"
            info, name = result.linears[w], key(mem_name)
            extra = allocation.stats.get((result.index, w), {}) if allocation else {}
            linears[name] = LinearPlan(result.index, mem_name, tuple(d.mask.shape), d.target_sparsity, round(d.sparsity, 8),
                                       d.group, info.block, {**d.stats, **extra, "shares_input_with": list(info.shares_input_with),
                                                             "feeds_attention": info.feeds_attention}, d.pattern)
            masks[name] = d.mask
            fingerprints[name] = layers.fingerprints[mem_name]
            if d.new_weight is not None:
                weights[name] = (d.new_weight, d.mask)     # unpacked when read (KeptWeights)
    model_info = {"fingerprint": fingerprint_of(fingerprints), **model_info}
    layers_stats = [{"layer": r.index, **r.stats} for r in results]
    run = {"device": str(layers.device), "dtype": str(layers.dtype).removeprefix("torch."),   # where it ran: not compared
           "peak_host_mib": round(process_peak_mib(), 1)}
    return Plan(config, model_info, linears, layers_stats, masks, weights, timing={**clock.record(), **run})


def open_whole(source: ModelSource, device: torch.device, dtype: str | None, *, allow_nonfinite: bool = False):
    """The model checked and loaded whole (float32, then its parameters cast to the compute dtype on ``device``)."""
    net = load_checked(source, allow_nonfinite=allow_nonfinite)
    layout = decoder_layout(net)
    index = checkpoint_index(source, net)
    compute = resolve_dtype(dtype, device, checkpoint_dtype(source, index, _layer_names(net, layout)), native_default=True)
    return net, layout, ResidentLayers(net, layout, device, compute)


def open_layer_by_layer(source: ModelSource, device: torch.device, dtype: str | None, *,
                        allow_nonfinite: bool = False):
    """The model on the meta device, its checkpoint checked (:func:`~tamp_fx.load.validate.check_checkpoint`),
    with the parts that compute the decoder's inputs read onto ``device``; its decoder layers are
    read from the checkpoint one at a time (values checked as they are read, unless ``allow_nonfinite``)."""
    probe = meta_model(source, torch.float32)
    index = checkpoint_index(source, probe)
    check_checkpoint(source, probe, index)
    compute = resolve_dtype(dtype, device, checkpoint_dtype(source, index, _layer_names(probe, decoder_layout(probe))),
                            native_default=True)
    net = probe if compute == torch.float32 else meta_model(source, compute)
    layout = decoder_layout(net)
    output = net.get_output_embeddings() if hasattr(net, "get_output_embeddings") else None
    head = next((name + "." for name, m in net.named_modules() if m is output), None)  # the LM head: not run
    capture = [n for n in net.state_dict() if not n.startswith(layout.prefix + ".")
               and not (head and n.startswith(head)) and n in index.entries]
    materialise(net, index.read(capture, compute, allow_nonfinite=allow_nonfinite), compute, device,
                exclude=layout.prefix)
    return net, layout, CheckpointLayers(net, layout, index, device, compute, allow_nonfinite=allow_nonfinite)


def _layer_names(net: torch.nn.Module, layout) -> list[str]:
    return [n for n, _ in net.named_parameters() if n.startswith(layout.prefix + ".")]


def plan_inputs(model: str | Path | ModelSource, calib: str | Path) -> tuple[Path, ...]:
    """What ``plan(model, calib)`` reads and a plan's ``--out`` must never replace: the model,
    the calibration file and the media files it names (checked on the way, in one line)."""
    source = resolve_source(model)
    return (source.path, *((program_calibration_file(calib),) if source.kind == "pt2" else calibration_inputs(calib)))


def _allocate(layers: DecoderLayers, acts: Activations, config: PlanConfig, bars: Bars, exporter,
              zeroth_order: Callable | None) -> Allocation | None:
    """Run what the allocation needs over the dense model and return its targets (None: uniform).
    ``zeroth_order(blocks, epsilon=, seed=, bars=)``: ECoFLaP's block importance over the whole model."""
    allocator = ALLOCATORS[config.allocation]
    if allocator.strategy is None:
        return None
    if allocator.needs_profile:
        start = list(acts.hidden)                     # the prune phase starts again from layer 0's inputs
        profiles = profile_layers(layers, acts, config, bars, exporter)
        acts.hidden = start
    else:
        profiles = layer_structure(layers, acts, config, exporter)
    extra = {}
    if allocator.needs_zeroth_order:
        blocks: dict[str, list[str]] = {}
        for p in profiles:
            for w, info in p.linears.items():
                blocks.setdefault(f"{p.index}:{info.block}", []).append(f"{layers.prefix(p.index)}.{w}")
        extra["block_importance"] = zeroth_order(blocks, epsilon=config.ecoflap_epsilon, seed=config.seed, bars=bars)
    with stage(ALLOCATION):
        return allocator.strategy(profiles, config, extra)
