"""``apply``: the one writer of pruned weights, for every source format. Each format reads the
model's tensors that the plan prunes, checks that the plan was made for them
(:meth:`~tamp_fx.artifact.plan.Plan.check_model`), and writes every tensor through :meth:`Plan.pruned`
into an all-or-nothing output (:mod:`tamp_fx.runtime.output`): a Hugging Face directory shard by
shard, a GGUF model as a Hugging Face directory, an exported program as a ``.pt2`` file; or, with
nothing written, a model already loaded (:func:`apply_in_memory`). A Hugging Face directory
records where it came from (:mod:`tamp_fx.write.provenance`)."""
from __future__ import annotations

import functools
import json
import logging
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors import safe_open

from tamp_fx.artifact.plan import Plan
from tamp_fx.errors import TampError
from tamp_fx.load.checkpoint import check_finite, checkpoint_keys, read_header, stored_fingerprint
from tamp_fx.load.fingerprint import fingerprint_sample
from tamp_fx.load.program import load_program
from tamp_fx.load.source import ModelSource, load_config, load_model, load_processor, resolve_source
from tamp_fx.load.validate import check_checkpoint, check_program, load_checked
from tamp_fx.prune import semi_structured
from tamp_fx.prune.semi_structured import FORMATS
from tamp_fx.runtime.output import check_output, temp_prefix
from tamp_fx.runtime.progress import Bars
from tamp_fx.runtime.tensor_file import DTYPES, Layout, save_tensors
from tamp_fx.runtime.transaction import atomic_directory
from tamp_fx.write.hf import copy_companions
from tamp_fx.write.int8_weight import save_int8_weight
from tamp_fx.write.program import apply_program
from tamp_fx.write.provenance import Provenance
from tamp_fx.write.quantize import QUANTIZERS, Quantizer, require_torchao

log = logging.getLogger(__name__)


def apply_inputs(model: str | Path | ModelSource, plan: Plan | str | Path, calib: str | Path | None = None) -> tuple[Path, ...]:
    """What ``apply(model, plan, ...)`` reads and its ``out`` must never replace: the model,
    the plan's directory and the calibration inputs of ``--quantize pt2e-x86``."""
    plan_dir = plan.path if isinstance(plan, Plan) else plan
    return tuple(Path(p) for p in (resolve_source(model).path, plan_dir, calib) if p is not None)


def apply(model: str | Path, plan: Plan | str | Path, out: str | Path, *, overwrite: bool = False,
          progress: bool = False, quantize: str | None = None, calib: str | Path | None = None,
          format: str = "dense", command: Sequence[str] | None = None, allow_nonfinite: bool = False) -> Path:
    """Write ``model`` with the plan's masks applied to ``out``: a directory that loads with
    ``from_pretrained`` like the input, every tensor the plan does not prune bit-identical.

    ``quantize="int8-weight"`` also quantizes the pruned linears with torchao int8 weight-only
    (:mod:`tamp_fx.write.int8_weight`; ``from_pretrained`` loads the result through transformers'
    TorchAoConfig integration). An exported program (``.pt2``) is written to the ``.pt2`` file
    ``out`` (:func:`tamp_fx.write.program.apply_program`), with ``quantize="pt2e-x86"`` quantized
    on the calibration inputs ``calib``.

    ``format="semi-structured"`` needs a 2:4 plan: the checkpoint is written in bfloat16 with the
    plan's 2:4 linears listed in ``semi_structured.json``; ``from_pretrained`` loads it dense, and
    :func:`tamp_fx.prune.semi_structured.load` on a CUDA GPU (sm80+) with 2:4 sparse weights. Writing it
    needs no GPU.

    A Hugging Face directory written also holds ``tamp-fx.json`` (the plan's method, sparsity,
    structure and calibration, the sparsity written, the model's fingerprint, ``command`` (the
    command line; None: the Python API), the input and the date) and a model card ``README.md``
    saying the same, or the input's card with a section appended (:mod:`tamp_fx.write.provenance`).

    The model is checked before anything is written (:mod:`tamp_fx.load.validate`); a tensor holding
    NaN or inf is refused unless ``allow_nonfinite``.
    """
    source = resolve_source(model)
    plan = plan if isinstance(plan, Plan) else Plan.load(plan)
    protect = apply_inputs(source, plan, calib)
    check_output(out, overwrite=overwrite, protect=protect, file=source.kind == "pt2")   # once, before any work
    if source.kind == "hf":
        load_config(source)              # a config.json from_pretrained cannot read is refused, not copied
    dtype = FORMATS[format].dtype
    finish = _semi_structured_finish(source, plan, quantize) if format == "semi-structured" else None
    if quantize is not None:
        _check_scheme_takes(QUANTIZERS[quantize], "program" if source.kind == "pt2" else "model")
    out = Path(out)
    if source.kind == "pt2":
        ep = load_program(source.path)
        check_program(ep, source.path, allow_nonfinite=allow_nonfinite)
        return apply_program(ep, plan, out, source.path, overwrite=overwrite, protect=protect,
                             quantize=quantize, calib=calib)
    record = Provenance(plan, source.path, out, command=command, format=format, quantize=quantize)
    check_checkpoint(source)
    write = functools.partial(_write_gguf if source.kind == "gguf" else _write_shards, allow_nonfinite=allow_nonfinite)
    if quantize is not None:
        return _apply_quantized(source, plan, out, overwrite, protect, progress, quantize, write, record)
    return write(source, plan, out, overwrite, protect, progress, dtype, _then(finish, record.write), record)


def _then(*steps: Callable[[Path], None] | None) -> Callable[[Path], None]:
    """One step that completes an output directory: ``steps`` in order (None: skipped)."""
    def finish(directory: Path) -> None:
        for step in steps:
            if step is not None:
                step(directory)
    return finish


def _write_shards(source: ModelSource, plan: Plan, out: Path, overwrite: bool, protect: tuple[Path, ...],
                  progress: bool, dtype: torch.dtype | None, finish: Callable[[Path], None] | None,
                  record: Provenance, *, allow_nonfinite: bool = False) -> Path:
    """A Hugging Face directory, shard by shard: every tensor through :meth:`Plan.pruned` (the
    plan's linears counted in ``record``), the companions (config, processor, ...) copied; a tensor
    holding NaN or inf refused as it is read, unless ``allow_nonfinite``."""
    keys = checkpoint_keys(source)
    shards = sorted(set(keys.values()))
    headers = {shard: read_header(shard) for shard in shards}
    # the plan checked against the sampled values (each tensor is read whole once, below, to be written)
    plan.check_model({name: stored_fingerprint(keys[name], name, headers[keys[name]], allow_nonfinite=allow_nonfinite)
                      for name in plan.linears if name in keys}, source.path)
    with atomic_directory(out, overwrite=overwrite, protect=protect) as tmp, Bars(progress) as bars:
        left = copy_companions(source.path, tmp, skip=(semi_structured.MANIFEST,))
        if left:
            log.warning("not copied to %s (unpruned weights in another format): %s", out, ", ".join(left))
        with bars.task("write shards", len(shards)) as advance:
            for shard in shards:
                with safe_open(shard, "pt") as f:
                    save_tensors(tmp / shard.name, {k: _cast_layout(f.get_slice(k), dtype) for k in f.keys()},
                                 functools.partial(_pruned, f, plan, source.path, dtype, record, allow_nonfinite),
                                 metadata=f.metadata())
                advance()
        if finish:
            finish(tmp)
    return out


def _pruned(f, plan: Plan, where: Path, dtype: torch.dtype | None, record: Provenance, allow_nonfinite: bool,
            key: str) -> torch.Tensor:
    """Tensor ``key`` of the open shard ``f`` as the output holds it: pruned, cast, counted in ``record``."""
    tensor = _cast(plan.pruned(key, _read(f, key, where, allow_nonfinite)), dtype)
    if key in plan.linears:
        record.count(tensor)
    return tensor


def _read(f, key: str, where: Path, allow_nonfinite: bool) -> torch.Tensor:
    """Tensor ``key`` of the open shard ``f``, refused if it holds NaN or inf (unless ``allow_nonfinite``)."""
    tensor = f.get_tensor(key)
    if not allow_nonfinite:
        check_finite(tensor, key, where)
    return tensor


@torch.no_grad()
def apply_in_memory(net: torch.nn.Module, plan: Plan | str | Path, *,
                    where: str | Path = "the model") -> torch.nn.Module:
    """Prune ``net`` (a model already loaded, Hugging Face or GGUF) in place as :func:`apply` would
    write it, and return it: the plan's linears, found by their in-memory names, are checked
    (:meth:`Plan.check_model`) and overwritten with :meth:`Plan.pruned`; nothing else changes.

    The check compares the plan's fingerprint with the parameters as they are, so load the model
    with the values its checkpoint stores (in that dtype, or in float32, ``load_model``'s default,
    which holds bfloat16 and float16 exactly) and cast after this: the pruned weights are then
    those :func:`apply` writes, bit for bit. ``where`` names the model in a refusal."""
    plan = plan if isinstance(plan, Plan) else Plan.load(plan)
    params = dict(net.named_parameters(remove_duplicate=False))
    tensors = {name: params[lp.module_name] for name, lp in plan.linears.items() if lp.module_name in params}
    plan.check_model({name: fingerprint_sample(t) for name, t in tensors.items()}, where)
    for name, param in tensors.items():
        param.copy_(plan.pruned(name, param))
    return net


def _write_gguf(source: ModelSource, plan: Plan, out: Path, overwrite: bool, protect: tuple[Path, ...],
                progress: bool, dtype: torch.dtype | None, finish: Callable[[Path], None] | None,
                record: Provenance, *, allow_nonfinite: bool = False) -> Path:
    """A GGUF model (de-quantized) as a Hugging Face directory, every tensor through :meth:`Plan.pruned`
    (the plan's linears counted in ``record``)."""
    net = apply_in_memory(load_checked(source, allow_nonfinite=allow_nonfinite), plan, where=source.path)
    if dtype is not None:
        net.to(dtype)
    params = dict(net.named_parameters(remove_duplicate=False))
    for lp in plan.linears.values():
        record.count(params[lp.module_name])
    return _save_hf(net, load_processor(source, net.config), out, overwrite, protect, finish)


def _cast_dtype(stored: torch.dtype, dtype: torch.dtype | None) -> torch.dtype:
    """Floating tensors are written in ``dtype`` (None: unchanged); integer and bool ones as they are."""
    return dtype if dtype is not None and stored.is_floating_point else stored


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return tensor.to(_cast_dtype(tensor.dtype, dtype))


def _cast_layout(part, dtype: torch.dtype | None) -> Layout:
    """The dtype and shape :func:`_cast` gives the stored tensor ``part`` (a safetensors slice), unread."""
    return _cast_dtype(DTYPES[part.get_dtype()], dtype), tuple(part.get_shape())


def _semi_structured_finish(source: ModelSource, plan: Plan, quantize: str | None) -> Callable[[Path], None]:
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
    for name, lp in plan.linears.items():
        if lp.pattern == "dense":                     # a pattern plan's linear left whole stays dense
            continue
        if not semi_structured.is_2_4(plan.masks[name]):
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


#: what a quantizer's ``takes`` is, named (in a refusal, after "quantizes"; after "for")
_KINDS = {"model": ("a Hugging Face model", "a Hugging Face or GGUF model"),
          "program": ("an exported program (.pt2)", "an exported program")}


def _check_scheme_takes(scheme: Quantizer, takes: str) -> None:
    """Refuse, in one line naming the schemes that fit, a scheme for the other kind of model."""
    if scheme.takes != takes:
        fitting = ", ".join(q.name for q in QUANTIZERS if q.takes == takes)
        raise TampError(f"--quantize {scheme.name} quantizes {_KINDS[scheme.takes][0]}: for {_KINDS[takes][1]} "
                        f"use --quantize {fitting}")


def _apply_quantized(source: ModelSource, plan: Plan, out: Path, overwrite: bool, protect: tuple[Path, ...],
                     progress: bool, quantize: str, write: Callable[..., Path], record: Provenance) -> Path:
    """Apply the plan with ``write`` to a staging directory beside ``out`` (its linears, before
    quantization, counted in ``record``), then quantize it into ``out``."""
    require_torchao()
    masks = {lp.module_name: plan.masks[name] for name, lp in plan.linears.items()}
    with atomic_directory(out, overwrite=overwrite, protect=protect) as tmp, \
            tempfile.TemporaryDirectory(prefix=temp_prefix(out) + "pruned-", dir=tmp.parent) as staging:
        pruned = write(source, plan, Path(staging) / "model", False, protect, progress, None, None, record)
        save_int8_weight(pruned, tmp, masks)
        record.write(tmp)
    return out


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
    check_checkpoint(source)                  # its header against its tensors, before a model is built
    net = load_model(source)
    return _save_hf(net, load_processor(source, net.config), Path(out), overwrite, (source.path,))
