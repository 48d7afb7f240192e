"""The plan artifact: ``plan.json`` (readable, diffable) and ``masks.safetensors`` (bit-packed keep-masks)."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tamp_fx.config import PlanConfig
from tamp_fx.errors import TampError
from tamp_fx.masks import PackedMask, PackedMasks
from tamp_fx.model_io import atomic_directory

SCHEMA_VERSION = 1
PLAN_FILE = "plan.json"
MASKS_FILE = "masks.safetensors"
WEIGHTS_FILE = "weights.safetensors"


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
    (:class:`~tamp_fx.masks.PackedMasks`; a plain dict given here is packed); ``weights`` holds the
    reconstructed values of methods that update kept weights (SparseGPT), already masked.
    """

    config: PlanConfig
    model: dict[str, Any]                     # fingerprint, model_type, architecture, source
    linears: dict[str, LinearPlan]
    layers: list[dict[str, Any]] = field(default_factory=list)
    masks: PackedMasks = field(default_factory=PackedMasks, compare=False, repr=False)
    weights: dict[str, torch.Tensor] = field(default_factory=dict, compare=False, repr=False)
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if not isinstance(self.masks, PackedMasks):
            object.__setattr__(self, "masks", PackedMasks(self.masks))

    def to_json(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "method": self.config.method,
            "parts": {"allocation": self.config.allocation, "score": self.config.score, "tokens": self.config.tokens},
            "config": self.config.to_dict(),
            "model": self.model,
            "summary": self.summary(),
            "layers": self.layers,
            "linears": {name: asdict(lp) for name, lp in self.linears.items()},
        }

    def summary(self) -> dict[str, Any]:
        total = sum(lp.shape[0] * lp.shape[1] for lp in self.linears.values())
        pruned = sum(lp.shape[0] * lp.shape[1] * lp.sparsity for lp in self.linears.values())
        return {"linears": len(self.linears), "parameters": total,
                "sparsity": round(pruned / total, 6) if total else 0.0}

    def save(self, out: str | Path, *, overwrite: bool = False, protect: tuple[Path, ...] = ()) -> Path:
        out = Path(out)
        with atomic_directory(out, overwrite=overwrite, protect=protect) as tmp:
            (tmp / PLAN_FILE).write_text(json.dumps(self.to_json(), indent=1) + "\n")
            packed = {name: self.masks.packed(name).packed for name in self.masks}
            shapes = {name: ",".join(map(str, self.masks.packed(name).shape)) for name in self.masks}
            save_file(packed, tmp / MASKS_FILE, metadata=shapes)
            if self.weights:
                save_file({k: v.detach().cpu().contiguous() for k, v in self.weights.items()}, tmp / WEIGHTS_FILE)
        return out

    @classmethod
    def load(cls, directory: str | Path) -> Plan:
        directory = Path(directory)
        plan_file, masks_file = directory / PLAN_FILE, directory / MASKS_FILE
        if not plan_file.is_file() or not masks_file.is_file():
            raise TampError(f"{directory} is not a plan directory (needs {PLAN_FILE} and {MASKS_FILE}): run `tamp-fx plan` first")
        try:
            data = json.loads(plan_file.read_text())
        except json.JSONDecodeError as error:
            raise TampError(f"{plan_file} is not valid JSON ({error}): re-run `tamp-fx plan`") from error
        if data.get("schema_version") != SCHEMA_VERSION:
            raise TampError(f"{plan_file} has schema_version {data.get('schema_version')!r}, this tamp-fx reads {SCHEMA_VERSION}")
        linears = {name: LinearPlan.from_dict(lp) for name, lp in data["linears"].items()}
        masks = PackedMasks()
        with safe_open(masks_file, "pt") as f:
            for name, lp in linears.items():
                if name not in f.keys():
                    raise TampError(f"{masks_file} has no mask for {name}: the plan directory is incomplete")
                packed = f.get_tensor(name)
                if packed.dtype != torch.uint8 or packed.shape != ((math.prod(lp.shape) + 7) // 8,):
                    raise TampError(f"{masks_file} holds a mask for {name} that does not fit its shape {lp.shape}: "
                                    "the plan directory is corrupt; re-run `tamp-fx plan`")
                masks[name] = PackedMask(packed, tuple(lp.shape))
        weights = {}
        if (directory / WEIGHTS_FILE).is_file():
            with safe_open(directory / WEIGHTS_FILE, "pt") as f:
                weights = {k: f.get_tensor(k) for k in f.keys()}
        return cls(PlanConfig.from_dict(data["config"]), data["model"], linears, data.get("layers", []), masks, weights)
