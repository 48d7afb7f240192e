"""The plan artifact: ``plan.json`` (readable, diffable) and ``masks.safetensors`` (bit-packed keep-masks)."""
from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from tamp_fx.config import PlanConfig
from tamp_fx.errors import TampError, first_line
from tamp_fx.load.fingerprint import FingerprintSample, fingerprint_of
from tamp_fx.prune.masks import KeptWeights, PackedMask, PackedMasks, apply_mask, check_packed
from tamp_fx.runtime.tensor_file import StoredTensor, save_tensors
from tamp_fx.runtime.timing import WRITING, with_part
from tamp_fx.runtime.transaction import atomic_directory

SCHEMA_VERSION = 1
PLAN_FILE = "plan.json"
MASKS_FILE = "masks.safetensors"
WEIGHTS_FILE = "weights.safetensors"
#: What ``plan.json``'s per-layer entries record about the run, not the plan: they differ between
#: two runs of one command (and between placements), everything else is identical.
RUN_MEASUREMENTS = ("seconds", "peak_host_mib", "host_mib", "peak_device_mib")
#: ``plan.json``'s record of the run's wall time and its parts (:class:`~tamp_fx.runtime.timing.Stopwatch`).
TIMING_KEY = "timing"
#: How :func:`describe_timing` names the parts.
#: The laps "profile" and "prune" are what their layer loops spent outside the named stages
#: (:mod:`tamp_fx.runtime.timing`: trace, layer forwards, statistics, token selection, pruning, ...).
TIMING_PARTS = {"profile": "dense profile, rest", "prune": "layer loop, rest"}


def without_run_measurements(plan_json: dict[str, Any]) -> dict[str, Any]:
    """``plan_json`` (a parsed ``plan.json``) without :data:`RUN_MEASUREMENTS` and its timing."""
    layers = [{k: v for k, v in layer.items() if k not in RUN_MEASUREMENTS} for layer in plan_json.get("layers", [])]
    return {**{k: v for k, v in plan_json.items() if k != TIMING_KEY}, "layers": layers}


def describe_timing(timing: dict[str, Any] | None) -> str:
    """``"413.9 s (load 12.0 s, capture 30.1 s, ...)"``, or ``"unknown"`` for a plan that has no record.

    >>> describe_timing({"wall_s": 3.5, "parts_s": {"load": 1.0, "prune": 2.5}})
    '3.5 s (load 1.0 s, prune 2.5 s)'
    """
    if not timing:
        return "unknown (not recorded by the tamp-fx that made this plan)"
    parts = ", ".join(f"{TIMING_PARTS.get(k, k)} {v:.1f} s" for k, v in timing.get("parts_s", {}).items())
    device, dtype = timing.get("device"), timing.get("dtype")
    where = f" on {device} in {dtype}" if isinstance(device, str) and isinstance(dtype, str) else ""
    peak = timing.get("peak_host_mib")
    peak = f", peak host memory {peak:,.0f} MiB" if isinstance(peak, (int, float)) else ""
    return f"{timing['wall_s']:.1f} s{where}{peak}" + (f" ({parts})" if parts else "")


def _timing(value: Any) -> dict[str, Any] | None:
    """plan.json's timing if it is well-formed, else None (unknown): it describes the run, not the plan."""
    parts = value.get("parts_s", {}) if isinstance(value, dict) else None
    numbers = isinstance(parts, dict) and all(isinstance(v, (int, float)) for v in [value.get("wall_s"), *parts.values()])
    return value if numbers else None


SHAPES_KEY = "shapes"          # masks.safetensors metadata: JSON {name: [C_out, C_in]}

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LinearPlan:
    """The decision for one linear, keyed in the plan by its weight's checkpoint name."""

    layer: int
    module_name: str              # in-memory parameter name
    shape: tuple[int, int]
    target_sparsity: float
    sparsity: float
    group: str                    # comparison group of the mask ("matrix", "row", "block128", or "N:M")
    block: str                    # "attention" or "mlp"
    stats: dict[str, Any] = field(default_factory=dict)
    pattern: str = "unstructured"  # "N:M" (N zeros in every M input columns of a row), or "dense" (left whole)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LinearPlan:
        return cls(**{**data, "shape": tuple(data["shape"])})


@dataclass(frozen=True)
class Plan:
    """A saved pruning decision: config, model identity, per-linear decisions and masks.

    ``masks`` maps checkpoint weight name -> bool keep-mask (C_out, C_in), held bit-packed
    (:class:`~tamp_fx.prune.masks.PackedMasks`; a plain dict given here is packed); ``weights`` holds the
    reconstructed values of methods that update kept weights (SparseGPT), already masked
    (:class:`~tamp_fx.prune.masks.KeptWeights`: held as their kept values until read).
    """

    config: PlanConfig
    model: dict[str, Any]                     # fingerprint, model_type, architecture, source
    linears: dict[str, LinearPlan]
    layers: list[dict[str, Any]] = field(default_factory=list)
    masks: PackedMasks = field(default_factory=PackedMasks, compare=False, repr=False)
    weights: KeptWeights = field(default_factory=KeptWeights, compare=False, repr=False)
    schema_version: int = SCHEMA_VERSION
    path: Path | None = field(default=None, compare=False, repr=False)   # the directory it was loaded from
    #: how long planning took: ``{"wall_s": s, "parts_s": {"load": s, "capture": s, ...}}``; None if not recorded
    timing: dict[str, Any] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.masks, PackedMasks):
            object.__setattr__(self, "masks", PackedMasks(self.masks))
        if not isinstance(self.weights, KeptWeights):
            object.__setattr__(self, "weights", KeptWeights(self.weights))

    def __repr__(self) -> str:
        s = self.summary()
        layers = len({lp.layer for lp in self.linears.values()})
        return (f"Plan(method={self.config.method!r}, sparsity: target {self.config.sparsity:.2%}, achieved "
                f"{s['sparsity']:.2%}, {s['linears']} linears in {layers} layers, "
                f"model {str(self.model.get('fingerprint') or '?')[:19]}...)")

    @property
    def wall_seconds(self) -> float | None:
        """The wall time of planning in seconds, as plan.json records it (None for plans made before it did)."""
        return self.timing["wall_s"] if self.timing else None

    @property
    def timing_text(self) -> str:
        """The wall time of planning and its parts, as ``inspect --html`` shows it (:func:`describe_timing`)."""
        return describe_timing(self.timing)

    def to_json(self) -> dict[str, Any]:
        timing = {TIMING_KEY: self.timing} if self.timing else {}
        return {
            "schema_version": self.schema_version,
            "method": self.config.method,
            "parts": {"allocation": self.config.allocation, "score": self.config.score, "tokens": self.config.tokens},
            "config": self.config.to_dict(),
            "model": self.model,
            "summary": self.summary(),
            "layers": self.layers,
            "linears": {name: asdict(lp) for name, lp in self.linears.items()},
            **timing,
        }

    def check_model(self, samples: Mapping[str, FingerprintSample], where: str | Path) -> None:
        """Refuse in one line unless the model's tensors, given by their :func:`fingerprint_sample`
        (by plan key: a writer reads one tensor at a time), are the ones the plan was made for:
        every pruned name present, the same shapes, the same fingerprint. Every writer of pruned
        weights asks this one question."""
        missing = [n for n in self.linears if n not in samples]
        if missing:
            raise TampError(f"the plan prunes {missing[0]}, which {where} does not have: the plan was made for another model")
        for name, lp in self.linears.items():
            if samples[name][0] != lp.shape:
                raise TampError(f"the plan's {name} has shape {lp.shape}, the model's {samples[name][0]}: "
                                "the plan was made for another model")
        if fingerprint_of(samples) != self.model.get("fingerprint"):
            raise TampError(f"the plan was made for another model (fingerprint differs from {where}): "
                            "re-run `tamp-fx plan` on this model")

    def pruned(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` (the model's ``name``) as the plan leaves it: masked, or replaced by the
        reconstructed weights (SparseGPT) and masked; a tensor the plan does not prune is returned
        as it is. Every writer of pruned weights goes through here."""
        if name not in self.masks:
            return tensor
        mask = self.masks[name]                                            # unpacked once
        value = self.weights.dense(name, mask).to(tensor.dtype) if name in self.weights else tensor
        return apply_mask(value, mask)

    def summary(self) -> dict[str, Any]:
        total = sum(lp.shape[0] * lp.shape[1] for lp in self.linears.values())
        pruned = sum(lp.shape[0] * lp.shape[1] * lp.sparsity for lp in self.linears.values())
        return {"linears": len(self.linears), "parameters": total,
                "sparsity": round(pruned / total, 6) if total else 0.0}

    def save(self, out: str | Path, *, overwrite: bool = False, protect: tuple[Path, ...] = ()) -> Path:
        """Write ``plan.json``, ``masks.safetensors`` and (when the method rewrote weights)
        ``weights.safetensors`` to the directory ``out``, atomically. The same plan gives the
        same bytes: safetensors metadata is one key (several are stored in hash order), and
        non-finite statistics are written as null (JSON has no NaN) with a warning."""
        out, start = Path(out), time.perf_counter()
        with atomic_directory(out, overwrite=overwrite, protect=protect) as tmp:
            packed = {name: self.masks.packed(name).packed for name in self.masks}
            shapes = {name: list(self.masks.packed(name).shape) for name in self.masks}
            save_tensors(tmp / MASKS_FILE, {name: (p.dtype, tuple(p.shape)) for name, p in packed.items()},
                         packed.__getitem__, metadata={SHAPES_KEY: json.dumps(shapes, sort_keys=True)})
            if self.weights:             # one weight unpacked (or read) at a time, not all of them at once
                save_tensors(tmp / WEIGHTS_FILE, {name: self.weights.layout(name) for name in self.weights},
                             self.weights.__getitem__)
            if self.timing and WRITING not in self.timing["parts_s"]:   # the run's first writing (a measurement:
                # not compared; saved again, a plan keeps it, so the same plan gives the same bytes)
                object.__setattr__(self, "timing", with_part(self.timing, WRITING, time.perf_counter() - start))
            (tmp / PLAN_FILE).write_text(json.dumps(_finite(self.to_json()), indent=1, allow_nan=False) + "\n")
        return out

    @classmethod
    def load(cls, directory: str | Path) -> Plan:
        """Read a plan directory, checking it against itself first: ``plan.json``'s structure,
        every mask's size and kept fraction against its linear's shape and sparsity, stored
        weights' shapes, and that every linear lies in the decoder the plan names. Anything
        wrong is a one-line TampError."""
        directory = Path(directory)
        plan_file, masks_file = directory / PLAN_FILE, directory / MASKS_FILE
        if not plan_file.is_file() or not masks_file.is_file():
            raise TampError(f"{directory} is not a plan directory (needs {PLAN_FILE} and {MASKS_FILE}): run `tamp-fx plan` first")
        try:
            data = json.loads(plan_file.read_text(encoding="utf-8"))
        except (ValueError, RecursionError) as error:      # JSONDecodeError, UnicodeDecodeError
            raise TampError(f"{plan_file} is not valid JSON ({first_line(error)}): re-run `tamp-fx plan`") from error
        bad = f"{plan_file} is damaged or was not written by tamp-fx"
        if not isinstance(data, dict):
            raise TampError(f"{bad}: it holds a {type(data).__name__}, not an object: re-run `tamp-fx plan`")
        if data.get("schema_version") != SCHEMA_VERSION:
            raise TampError(f"{plan_file} has schema_version {data.get('schema_version')!r}, this tamp-fx reads {SCHEMA_VERSION}")
        for key, kind in (("config", dict), ("model", dict), ("linears", dict), ("layers", list)):
            if not isinstance(data.get(key, [] if key == "layers" else None), kind):
                raise TampError(f"{bad}: \"{key}\" is missing or not a{'n object' if kind is dict else ' list'}: "
                                "re-run `tamp-fx plan`")
        try:
            config = PlanConfig.from_dict(data["config"])
        except TampError as error:
            raise TampError(f"{bad}: {error}") from error
        except Exception as error:  # noqa: BLE001 - a config of the wrong types fails anywhere in its checks
            raise TampError(f"{bad}: its config is invalid ({first_line(error)}): re-run `tamp-fx plan`") from error
        linears = {name: _linear(name, lp, bad) for name, lp in data["linears"].items()}
        _check_decoder(data["model"].get("decoder", ""), linears, bad)
        masks, shapes = _read_tensors(masks_file, "masks")
        weights = _open_weights(directory / WEIGHTS_FILE) if (directory / WEIGHTS_FILE).is_file() else {}
        for stored, what in ((masks, "a mask"), (weights, "weights")):
            extra = sorted(set(stored) - set(linears))
            if extra:
                raise TampError(f"{directory} has {what} for {extra[0]}, which {PLAN_FILE} does not list: "
                                "the plan directory is damaged")
        kept = PackedMasks()
        for name, lp in linears.items():
            if name not in masks:
                raise TampError(f"{masks_file} has no mask for {name}: the plan directory is incomplete")
            if shapes.get(name, lp.shape) != lp.shape:
                raise TampError(f"{masks_file} stores the mask of {name} as {shapes[name]}, {PLAN_FILE} says {lp.shape}: "
                                "the plan directory is damaged")
            mask = PackedMask(masks[name], tuple(lp.shape))
            try:
                check_packed(mask.packed, mask.shape)
            except ValueError as error:
                raise TampError(f"{masks_file}: the mask of {name} does not fit its shape {lp.shape} ({error}): "
                                "the plan directory is damaged") from error
            if abs(mask.sparsity() - lp.sparsity) > _SPARSITY_TOLERANCE:
                raise TampError(f"{masks_file}: the mask of {name} prunes {mask.sparsity():.4%}, but "
                                f"{PLAN_FILE} says {lp.sparsity:.4%}: the plan directory is damaged")
            if name in weights and (weights[name].shape != lp.shape or not weights[name].dtype.is_floating_point):
                raise TampError(f"{directory / WEIGHTS_FILE}: {name} is {weights[name].dtype} of shape "
                                f"{tuple(weights[name].shape)}, the plan's linear is {lp.shape}: the plan directory is damaged")
            kept[name] = mask
        return cls(config, data["model"], linears, data.get("layers", []), kept, weights, path=directory,
                   timing=_timing(data.get(TIMING_KEY)))


#: A mask's pruned fraction may differ from its entry's ``sparsity`` (rounded to 8 places) by this much.
_SPARSITY_TOLERANCE = 1e-6


def _finite(value: Any, where: str = "") -> Any:
    """``value`` (JSON-like) with every NaN or infinity replaced by None, logging where."""
    if isinstance(value, float) and not math.isfinite(value):
        log.warning("plan statistic %s is %s: written as null", where or "value", value)
        return None
    if isinstance(value, dict):
        return {k: _finite(v, f"{where}.{k}" if where else str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v, f"{where}[{i}]") for i, v in enumerate(value)]
    return value


_LINEAR_FIELDS = {f.name: f for f in fields(LinearPlan)}
_LINEAR_TYPES = {"layer": int, "module_name": str, "target_sparsity": (int, float), "sparsity": (int, float),
                 "group": str, "block": str, "stats": dict, "pattern": str}


def _linear(name: str, data: Any, bad: str) -> LinearPlan:
    """One ``linears`` entry of plan.json, checked: known keys, types, a 2-D shape, sparsities in [0, 1]."""
    where = f"{bad}: linear {name}"
    if not isinstance(data, dict):
        raise TampError(f"{where} is a {type(data).__name__}, not an object")
    unknown = sorted(set(data) - set(_LINEAR_FIELDS))
    if unknown:
        raise TampError(f"{where} has unknown key {unknown[0]!r}")
    missing = [k for k, f in _LINEAR_FIELDS.items() if k not in data and f.default is MISSING and f.default_factory is MISSING]
    if missing:
        raise TampError(f"{where} has no {missing[0]!r}")
    for key, kind in _LINEAR_TYPES.items():
        if key in data and (not isinstance(data[key], kind) or isinstance(data[key], bool)):
            raise TampError(f"{where}: {key!r} is {data[key]!r}, not a {getattr(kind, '__name__', 'number')}")
    shape = data["shape"]
    if (not isinstance(shape, list) or len(shape) != 2
            or not all(isinstance(d, int) and not isinstance(d, bool) and 0 < d < 2**40 for d in shape)):
        raise TampError(f"{where}: 'shape' is {shape!r}, not two positive integers")
    for key in ("target_sparsity", "sparsity"):
        if not 0.0 <= data[key] <= 1.0:                   # NaN fails too
            raise TampError(f"{where}: {key!r} is {data[key]!r}, outside [0, 1]")
    return LinearPlan.from_dict(data)


def _check_decoder(decoder: Any, linears: dict[str, LinearPlan], bad: str) -> None:
    """Every linear is a weight of the plan's decoder (``model.decoder``, a module prefix; ""
    for an exported program), and its checkpoint name is its module name or a renamed prefix of it."""
    if not isinstance(decoder, str):
        raise TampError(f"{bad}: model.decoder is {decoder!r}, not a module name")
    for name, lp in linears.items():
        if decoder and not lp.module_name.startswith(decoder + "."):
            raise TampError(f"{bad}: linear {name} ({lp.module_name}) is not in the plan's decoder {decoder}")
        rest = lp.module_name[len(decoder) + 1:] if decoder else lp.module_name
        if not (name == rest or name.endswith("." + rest)):
            raise TampError(f"{bad}: linear {name} does not name the weight {lp.module_name}")


def _open_weights(path: Path) -> dict[str, StoredTensor]:
    """The tensors of a plan's ``weights.safetensors``, each read only when a writer asks for it:
    a SparseGPT plan of an 8B model holds ~14 GB of them."""
    try:
        return StoredTensor.open_all(path)
    except Exception as error:  # noqa: BLE001 - SafetensorError, OSError, or a dtype safetensors names and torch has not
        raise TampError(f"{path} is not a readable safetensors file of weights ({first_line(error)}): "
                        "the plan directory is damaged, re-run `tamp-fx plan`") from error


def _read_tensors(path: Path, what: str) -> tuple[dict[str, torch.Tensor], dict[str, tuple[int, ...]]]:
    """The tensors of a plan's safetensors file and the shapes its metadata records: this
    version's one JSON entry, or one "C_out,C_in" entry per mask (earlier versions)."""
    damaged = f"{path} is not a readable safetensors file of {what}"
    try:
        with safe_open(path, "pt") as f:
            tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
        recorded = json.loads(metadata[SHAPES_KEY]) if SHAPES_KEY in metadata else {
            k: v.split(",") for k, v in metadata.items() if k in tensors}
        shapes = {k: tuple(int(d) for d in v) for k, v in recorded.items()}
    except Exception as error:  # noqa: BLE001 - SafetensorError, OSError, or metadata that is not shapes
        raise TampError(f"{damaged} ({first_line(error)}): the plan directory is damaged, re-run `tamp-fx plan`") from error
    return tensors, shapes
