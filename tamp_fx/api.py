"""The public verbs: ``plan`` (calibrate and decide) and ``apply`` (write a pruned model)."""
from __future__ import annotations

import functools
import json
import logging
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tamp_fx.adapters import decoder_layout, modality_token_ids
from tamp_fx.artifact import LinearPlan, Plan
from tamp_fx.calibration import calibration_inputs, load_calibration
from tamp_fx.capture import Activations, capture_layer_inputs
from tamp_fx.config import PlanConfig
from tamp_fx.allocators import ALLOCATORS, Allocation
from tamp_fx.driver import LayerResult, layer_structure, profile_layers, prune_layers
from tamp_fx.ecoflap import lm_loss, zeroth_order_block_importance
from tamp_fx import distributed, semi_structured
from tamp_fx.graph import LayerExporter
from tamp_fx.errors import TampError
from tamp_fx.masks import apply_mask
from tamp_fx.layers import CheckpointLayers, DecoderLayers, ResidentLayers
from tamp_fx.model_io import (ModelSource, atomic_directory, check_output, checkpoint_dtype, checkpoint_index,
                              checkpoint_keys, copy_companions, fingerprint, fingerprint_of, load_model, load_processor, materialise,
                              meta_model, release, resolve_source, temp_prefix)
from tamp_fx.placement import check_dtype, resolve_device, resolve_dtype
from tamp_fx.progress import Bars
from tamp_fx.exported import apply_program, load_program, load_program_calibration, program_loss, program_weights
from tamp_fx.program import ProgramLayerExporter, ProgramLayers, capture_program_inputs, program_layout
from tamp_fx.quantize import QUANTIZERS, _require_torchao
from tamp_fx.quantized_hf import save_int8_weight

log = logging.getLogger(__name__)


def plan(model: str | Path, calib: str | Path, config: PlanConfig = PlanConfig(), *, progress: bool = False,
         device: str | torch.device | None = None, dtype: str | None = None, offload_activations: bool = False,
         layer_by_layer: bool | None = None) -> Plan:
    """Calibrate on ``calib`` and decide a keep-mask for every linear of the language decoder.

    A Hugging Face / GGUF model and an exported program (``.pt2``) go through the same
    layer-by-layer driver: capture the inputs of the first decoder layer, then profile,
    allocate and prune layer by layer (:mod:`tamp_fx.driver`, over :class:`tamp_fx.layers.DecoderLayers`).

    Where it runs is no part of the plan (:mod:`tamp_fx.placement`): ``device`` (``"cpu"``,
    ``"cuda"``, ``"cuda:N"``; None: CUDA when available), ``dtype`` of the forward passes
    (``"auto"`` = the checkpoint's, ``"float32"``, ``"bfloat16"``, ``"float16"``; None: float32
    on the CPU, auto on CUDA), ``offload_activations`` (keep the calibration activations in host
    memory and move them to ``device`` a sample at a time). ``layer_by_layer`` (None: yes for a
    Hugging Face directory) builds the model on the meta device, materialises only what computes
    the decoder's inputs, and reads each decoder layer from the checkpoint when it is planned; a
    GGUF file and ECoFLaP's allocation (a loss over the whole model) load the model whole.
    An exported program is planned on the CPU, as stored.

    Nothing is written: save the result with ``Plan.save``.

    Under ``torchrun`` every rank plans on its share of the samples (:mod:`tamp_fx.distributed`)
    and returns the same plan; save it on rank 0.
    """
    world = distributed.init_from_env()              # under torchrun: cuda:LOCAL_RANK is the current device
    with distributed.guarded():
        source = resolve_source(model)
        if source.kind == "pt2" and world.distributed:
            raise TampError("an exported program (.pt2) is planned in one process: run `tamp-fx plan` without torchrun")
        if source.kind == "pt2":
            if device is not None and torch.device(device).type != "cpu" or dtype not in (None, "auto"):
                raise TampError("an exported program (.pt2) is planned on the CPU in its own dtype: drop --device and --dtype")
            return _plan_program(source, calib, config, progress)
        target = resolve_device(device)
        if world.distributed and target.type == "cuda" and target != world.device:
            raise TampError(f"under torchrun rank {world.rank} computes on {world.device}, not {target}: "
                            "pass --device cuda (each rank takes cuda:LOCAL_RANK)")
        check_dtype(dtype)
        whole_only = source.kind == "gguf" or ALLOCATORS[config.allocation][1]
        if layer_by_layer and whole_only:
            raise TampError(f"layer-by-layer loading needs a Hugging Face directory and an allocation other than ecoflap "
                            f"({source.path.name}, {config.allocation}): load the model whole")
        layer_by_layer = not whole_only if layer_by_layer is None else layer_by_layer
        net, layout, layers = (_open_layer_by_layer if layer_by_layer else _open_whole)(source, target, dtype)
        processor = load_processor(source, net.config)
        token_ids = modality_token_ids(net.config)
        samples = load_calibration(calib, processor, nsamples=config.nsamples, seqlen=config.seqlen, seed=config.seed,
                                   shard=(world.rank, world.size))
    n_samples = distributed.total_count(len(samples))
    with distributed.guarded():
        if n_samples < world.size:
            raise TampError(f"{n_samples} calibration sample(s) for {world.size} processes: every process needs one; "
                            "use more samples or fewer processes")
    with Bars(progress and world.rank == 0) as bars:
        with distributed.guarded(), bars.task("capture decoder inputs", len(samples)) as advance:
            acts = capture_layer_inputs(net, layout, samples, token_ids, advance, device=target,
                                        offload=offload_activations)
        if layer_by_layer:
            release(net)                              # the capture parts are done with: keep one layer at a time
        zeroth_order = None
        if ALLOCATORS[config.allocation][1]:
            zeroth_order = functools.partial(zeroth_order_block_importance, dict(net.named_parameters()), samples,
                                             lm_loss(net, token_ids))
        results, allocation = _plan_layers(layers, acts, config, bars, LayerExporter(), zeroth_order)
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
    return _assemble(config, model_info, layers, results, allocation, index.key)


def _plan_program(source: ModelSource, calib: str | Path, config: PlanConfig, progress: bool) -> Plan:
    """Plan an exported program: its decoder layers found by structure (:mod:`tamp_fx.program`)."""
    ep = load_program(source.path)
    samples = load_program_calibration(calib, config.nsamples)
    layout = program_layout(ep, str(source.path))
    with Bars(progress) as bars:
        with bars.task("capture decoder inputs", len(samples)) as advance:
            acts = capture_program_inputs(layout, samples, advance)
        zeroth_order = None
        if ALLOCATORS[config.allocation][1]:
            gm = ep.module()
            zeroth_order = functools.partial(zeroth_order_block_importance, dict(gm.named_parameters()), samples,
                                             program_loss(gm, samples))
        results, allocation = _plan_layers(ProgramLayers(layout), acts, config, bars, ProgramLayerExporter(), zeroth_order)
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
    return _assemble(config, model_info, ProgramLayers(layout), results, allocation, lambda name: name)


def _plan_layers(layers: DecoderLayers, acts: Activations, config: PlanConfig, bars: Bars, exporter,
                 zeroth_order: Callable | None) -> tuple[list[LayerResult], Allocation | None]:
    """The sequential driver over ``layers``: allocate on the dense model, then prune."""
    allocation = _allocate(layers, acts, config, bars, exporter, zeroth_order)
    targets = ((lambda i, linears: {w: config.sparsity for w in linears}) if allocation is None
               else (lambda i, linears: {w: allocation.targets[(i, w)] for w in linears}))
    return prune_layers(layers, acts, config, targets, bars, exporter), allocation


def _assemble(config: PlanConfig, model_info: dict, layers: DecoderLayers, results: list[LayerResult],
              allocation: Allocation | None, key: Callable[[str], str]) -> Plan:
    """The plan of the driver's results; ``key`` maps an in-memory parameter name to its plan key."""
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
                weights[name] = d.new_weight
    model_info = {"fingerprint": fingerprint_of(fingerprints), **model_info}
    layers_stats = [{"layer": r.index, **r.stats} for r in results]
    return Plan(config, model_info, linears, layers_stats, masks, weights)


def _open_whole(source: ModelSource, device: torch.device, dtype: str | None):
    """The model loaded whole (float32, then its parameters cast to the compute dtype on ``device``)."""
    net = load_model(source)
    layout = decoder_layout(net)
    index = checkpoint_index(source, net)
    compute = resolve_dtype(dtype, device, checkpoint_dtype(source, index, _layer_names(net, layout)))
    return net, layout, ResidentLayers(net, layout, device, compute)


def _open_layer_by_layer(source: ModelSource, device: torch.device, dtype: str | None):
    """The model on the meta device with the parts that compute the decoder's inputs read onto
    ``device``; its decoder layers are read from the checkpoint one at a time."""
    probe = meta_model(source, torch.float32)
    index = checkpoint_index(source, probe)
    compute = resolve_dtype(dtype, device, checkpoint_dtype(source, index, _layer_names(probe, decoder_layout(probe))))
    net = probe if compute == torch.float32 else meta_model(source, compute)
    layout = decoder_layout(net)
    output = net.get_output_embeddings() if hasattr(net, "get_output_embeddings") else None
    head = next((name + "." for name, m in net.named_modules() if m is output), None)  # the LM head: not run
    capture = [n for n in net.state_dict() if not n.startswith(layout.prefix + ".")
               and not (head and n.startswith(head)) and n in index.entries]
    materialise(net, index.read(capture, compute), compute, device, exclude=layout.prefix)
    return net, layout, CheckpointLayers(net, layout, index, device, compute)


def _layer_names(net: torch.nn.Module, layout) -> list[str]:
    return [n for n, _ in net.named_parameters() if n.startswith(layout.prefix + ".")]


def plan_inputs(model: str | Path, calib: str | Path) -> tuple[Path, ...]:
    """What ``plan(model, calib)`` reads and a plan's ``--out`` must never replace: the model,
    the calibration file and the media files it names (checked on the way, in one line)."""
    return (resolve_source(model).path, *calibration_inputs(calib))


def apply_inputs(model: str | Path, plan_: Plan | str | Path, calib: str | Path | None = None) -> tuple[Path, ...]:
    """What ``apply(model, plan_, ...)`` reads and its ``out`` must never replace: the model,
    the plan's directory and the calibration inputs of ``--quantize pt2e-x86``."""
    plan_dir = plan_.path if isinstance(plan_, Plan) else plan_
    return tuple(Path(p) for p in (resolve_source(model).path, plan_dir, calib) if p is not None)


def _allocate(layers: DecoderLayers, acts: Activations, config: PlanConfig, bars: Bars, exporter,
              zeroth_order: Callable | None) -> Allocation | None:
    """Run what the allocation needs over the dense model and return its targets (None: uniform).
    ``zeroth_order(blocks, epsilon=, seed=, bars=)``: ECoFLaP's block importance over the whole model."""
    needs_profile, needs_zeroth_order, strategy = ALLOCATORS[config.allocation]
    if strategy is None:
        return None
    if needs_profile:
        start = list(acts.hidden)                     # the prune phase starts again from layer 0's inputs
        profiles = profile_layers(layers, acts, config, bars, exporter)
        acts.hidden = start
    else:
        profiles = layer_structure(layers, acts, config, exporter)
    extra = {}
    if needs_zeroth_order:
        blocks: dict[str, list[str]] = {}
        for p in profiles:
            for w, info in p.linears.items():
                blocks.setdefault(f"{p.index}:{info.block}", []).append(f"{layers.prefix(p.index)}.{w}")
        extra["block_importance"] = zeroth_order(blocks, epsilon=config.ecoflap_epsilon, seed=config.seed, bars=bars)
    return strategy(profiles, config, extra)


def _check_plan_matches(plan_: Plan, tensors: dict[str, torch.Tensor], source: ModelSource) -> None:
    missing = [n for n in plan_.linears if n not in tensors]
    if missing:
        raise TampError(f"the plan prunes {missing[0]}, which {source.path} does not have: the plan was made for another model")
    for name, lp in plan_.linears.items():
        if tuple(tensors[name].shape) != lp.shape:
            raise TampError(f"the plan's {name} has shape {lp.shape}, the model's {tuple(tensors[name].shape)}: "
                            "the plan was made for another model")
    if fingerprint(tensors) != plan_.model.get("fingerprint"):
        raise TampError(f"the plan was made for another model (fingerprint differs from {source.path}): "
                        "re-run `tamp-fx plan` on this model")


def apply(model: str | Path, plan_: Plan | str | Path, out: str | Path, *, overwrite: bool = False,
          progress: bool = False, quantize: str | None = None, calib: str | Path | None = None,
          format: str = "dense") -> Path:
    """Write ``model`` with the plan's masks applied to ``out``: a directory that loads with
    ``from_pretrained`` like the input, every tensor the plan does not prune bit-identical.

    ``quantize="int8-weight"`` also quantizes the pruned linears with torchao int8 weight-only
    (:mod:`tamp_fx.quantized_hf`; ``from_pretrained`` loads the result through transformers'
    TorchAoConfig integration). An exported program (``.pt2``) is written to the ``.pt2`` file
    ``out`` (:func:`tamp_fx.exported.apply_program`), with ``quantize="pt2e-x86"`` quantized
    on the calibration inputs ``calib``.

    ``format="semi-structured"`` needs a 2:4 plan: the checkpoint is written in bfloat16 with the
    plan's 2:4 linears listed in ``semi_structured.json``; ``from_pretrained`` loads it dense, and
    :func:`tamp_fx.semi_structured.load` on a CUDA GPU (sm80+) with 2:4 sparse weights. Writing it
    needs no GPU.
    """
    source = resolve_source(model)
    plan_ = plan_ if isinstance(plan_, Plan) else Plan.load(plan_)
    protect = apply_inputs(model, plan_, calib)
    check_output(out, overwrite=overwrite, protect=protect, file=source.kind == "pt2")
    if quantize is not None and quantize not in QUANTIZERS:
        raise TampError(f"unknown quantization scheme {quantize!r}; valid schemes are {', '.join(QUANTIZERS)}")
    if format not in semi_structured.FORMATS:
        raise TampError(f"unknown format {format!r}; valid formats are {', '.join(semi_structured.FORMATS)}")
    finish = None
    if format == "semi-structured":
        finish = _semi_structured_finish(source, plan_, quantize)
    if source.kind == "pt2":
        ep = load_program(source.path)
        _check_plan_matches(plan_, program_weights(ep, plan_.linears), source)
        return apply_program(ep, plan_, Path(out), overwrite=overwrite, protect=protect, quantize=quantize, calib=calib)
    if quantize is not None:
        return _apply_quantized(source, plan_, Path(out), overwrite, protect, progress, quantize)
    dtype = torch.bfloat16 if finish else None
    if source.kind == "gguf":
        return _apply_gguf(source, plan_, Path(out), overwrite, protect, dtype, finish)
    keys = checkpoint_keys(source)
    tensors = {}
    for name in plan_.linears:
        if name in keys:
            with safe_open(keys[name], "pt") as f:
                tensors[name] = f.get_tensor(name)
    _check_plan_matches(plan_, tensors, source)
    shards = sorted(set(keys.values()))
    with atomic_directory(Path(out), overwrite=overwrite, protect=protect) as tmp, Bars(progress) as bars:
        left = copy_companions(source.path, tmp, skip=(semi_structured.MANIFEST,))
        if left:
            log.warning("not copied to %s (unpruned weights in another format): %s", out, ", ".join(left))
        with bars.task("write shards", len(shards)) as advance:
            for shard in shards:
                with safe_open(shard, "pt") as f:
                    metadata = f.metadata()
                    out_tensors = {k: _cast(_pruned(plan_, k, f.get_tensor(k)), dtype) for k in f.keys()}
                save_file(out_tensors, tmp / shard.name, metadata=metadata)
                advance()
        if finish:
            finish(tmp)
    return Path(out)


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """Floating tensors in ``dtype`` (None: unchanged); integer and bool tensors stay as they are."""
    return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor


def _semi_structured_finish(source: ModelSource, plan_: Plan, quantize: str | None) -> Callable[[Path], None]:
    """Refuse what ``format="semi-structured"`` cannot write (in one line, before anything is
    written); otherwise the step that completes the output directory: config dtype bfloat16 and
    the manifest of 2:4 linears."""
    if quantize is not None:
        raise TampError(f"--format semi-structured and --quantize {quantize} cannot be combined (2:4 weights here are "
                        "bfloat16): choose one")
    if source.kind == "pt2":
        raise TampError(f"--format semi-structured does not take an exported program (.pt2) yet: apply the plan to "
                        f"{source.path.name} with --format dense, or to the Hugging Face model it came from")
    modules = []
    for name, lp in plan_.linears.items():
        if lp.pattern == "dense":                     # a pattern plan's linear left whole stays dense
            continue
        if not semi_structured.is_2_4(plan_.masks[name]):
            raise TampError(f"--format semi-structured needs a 2:4 plan, but {name} is {lp.pattern} "
                            f"({lp.sparsity:.1%} sparse): plan with `--pattern 2:4`")
        try:
            semi_structured.check_shape(lp.shape, torch.bfloat16)
        except ValueError as error:
            raise TampError(f"{name} cannot use the 2:4 kernels ({error}): use --format dense") from error
        modules.append(lp.module_name.removesuffix(".weight"))
    if not modules:
        raise TampError("--format semi-structured needs a 2:4 plan, but this plan prunes no linear: "
                        "plan with `--pattern 2:4`")

    def finish(directory: Path) -> None:
        _set_config_dtype(directory / "config.json", "bfloat16")
        semi_structured.write_manifest(directory, modules, torch.bfloat16)
    return finish


def _set_config_dtype(path: Path, dtype: str) -> None:
    """Set ``dtype`` (``torch_dtype`` before transformers 5) in a config.json and its sub-configs."""
    def update(node: dict) -> None:
        node["dtype"] = dtype
        node.pop("torch_dtype", None)
        for value in node.values():
            if isinstance(value, dict) and ("dtype" in value or "torch_dtype" in value):
                update(value)
    config = json.loads(path.read_text())
    update(config)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _apply_quantized(source: ModelSource, plan_: Plan, out: Path, overwrite: bool, protect: tuple[Path, ...],
                     progress: bool, quantize: str) -> Path:
    """Apply the plan to a staging directory beside ``out``, then quantize it into ``out``."""
    if quantize != "int8-weight":
        raise TampError(f"--quantize {quantize} quantizes an exported program (.pt2): for a Hugging Face or GGUF "
                        "model use --quantize int8-weight")
    _require_torchao()
    masks = {lp.module_name: plan_.masks[name] for name, lp in plan_.linears.items()}
    with atomic_directory(out, overwrite=overwrite, protect=protect) as tmp, \
            tempfile.TemporaryDirectory(prefix=temp_prefix(out) + "pruned-", dir=tmp.parent) as staging:
        pruned = apply(source.path, plan_, Path(staging) / "model", progress=progress)
        save_int8_weight(pruned, tmp, masks)
    return out


def _pruned(plan_: Plan, name: str, tensor: torch.Tensor) -> torch.Tensor:
    """The tensor as the plan leaves it: masked, or replaced by reconstructed weights."""
    if name not in plan_.masks:
        return tensor
    value = plan_.weights[name].to(tensor.dtype) if name in plan_.weights else tensor
    return apply_mask(value, plan_.masks[name])


def _apply_gguf(source: ModelSource, plan_: Plan, out: Path, overwrite: bool, protect: tuple[Path, ...],
                dtype: torch.dtype | None = None, finish: Callable[[Path], None] | None = None) -> Path:
    net = load_model(source)
    state = net.state_dict()
    _check_plan_matches(plan_, {n: state[n] for n in plan_.linears if n in state}, source)
    with torch.no_grad():
        for name in plan_.masks:
            net.get_parameter(name).copy_(_pruned(plan_, name, state[name]))
    if dtype is not None:
        net.to(dtype)
    return _save_hf(net, load_processor(source, net.config), out, overwrite, protect, finish)


def _save_hf(net: torch.nn.Module, processor, out: Path, overwrite: bool, protect: tuple[Path, ...],
             finish: Callable[[Path], None] | None = None) -> Path:
    with atomic_directory(out, overwrite=overwrite, protect=protect) as tmp:
        net.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        if finish:
            finish(tmp)
    return out


def convert(model: str | Path, out: str | Path, *, overwrite: bool = False) -> Path:
    """Write a GGUF model as a Hugging Face directory (de-quantized, float32), which loads
    faster and keeps later plans and checks tensor-exact."""
    source = resolve_source(model)
    if source.kind != "gguf":
        raise TampError(f"{source.path} is not a .gguf file: convert turns GGUF models into Hugging Face directories")
    check_output(out, overwrite=overwrite, protect=(source.path,))
    net = load_model(source)
    return _save_hf(net, load_processor(source, net.config), Path(out), overwrite, (source.path,))


__all__ = ["plan", "apply", "convert"]
