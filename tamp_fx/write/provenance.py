"""What ``apply`` records beside the Hugging Face directory it writes: ``tamp-fx.json`` (the plan's
method, sparsity, structure and calibration, the sparsity actually written, the model's
fingerprint, and how and when the output was made) and a model card ``README.md`` saying the same:
a new card where the input had none, else the input's card (its copy) with a section appended."""
from __future__ import annotations

import dataclasses
import datetime
import json
import re
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

import tamp_fx
from tamp_fx.artifact.plan import Plan
from tamp_fx.config import CUSTOM, PlanConfig
from tamp_fx.errors import TampError, first_line
from tamp_fx.runtime.placement import DTYPES

PROVENANCE_FILE = "tamp-fx.json"
CARD_FILE = "README.md"
CARD_SECTION = "## Pruning (tamp-fx)"
SCHEMA_VERSION = 1
#: ``command`` of an output written through the Python API rather than the command line
PYTHON_API = "tamp_fx.apply (Python API)"

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_ALWAYS = ("method", "sparsity", "nsamples", "seqlen", "seed")        # plan flags the reproduce line always gives
_PARTS = ("allocation", "score", "tokens")
_FLAGS = (*_ALWAYS, "pattern", *_PARTS, "atv_alpha", "max_sparsity_delta", "sequential")   # PlanConfig fields `tamp-fx plan` takes


class Provenance:
    """The record of one ``apply`` of ``plan`` to ``model``, written to ``out``: told every decoder
    linear as it is written (:meth:`count`), then written into the output directory (:meth:`write`).
    ``command``: the command line (None: the Python API)."""

    def __init__(self, plan: Plan, model: Path, out: Path, *, command: Sequence[str] | None = None,
                 format: str = "dense", quantize: str | None = None) -> None:
        self.plan, self.model, self.out = plan, Path(model).absolute(), Path(out).absolute()
        self.command, self.format, self.quantize = command, format, quantize
        self.zeros = self.total = 0

    def count(self, weight: torch.Tensor) -> None:
        """Count the zeros of one pruned decoder linear's weight, as written."""
        self.zeros += int(torch.count_nonzero(weight == 0))     # 3x faster than (weight == 0).sum() (int64 sum)
        self.total += weight.numel()

    def to_json(self) -> dict[str, Any]:
        plan, config = self.plan, self.plan.config
        summary = plan.summary()
        if self.total != summary["parameters"]:
            raise TampError(f"apply counted {self.total:,} decoder linear weights, the plan has "
                            f"{summary['parameters']:,}: please report this")
        model = {k: v for k, v in plan.model.items() if k != "calibration"}
        recorded = plan.model.get("calibration")
        calibration = {**(recorded if isinstance(recorded, dict) else {}), "nsamples": config.nsamples,
                       "seqlen": config.seqlen, "seed": config.seed}
        plan_dir = str(plan.path.absolute()) if plan.path is not None else None
        calib = calibration.get("file")
        calib = calib if isinstance(calib, str) and calib else "CALIB"     # what an edited plan.json records may be anything
        return {
            "schema_version": SCHEMA_VERSION,
            "tamp_fx_version": tamp_fx.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).date().isoformat(),
            "command": list(self.command) if self.command is not None else PYTHON_API,
            "input_model": str(self.model),
            "base_model": base_model(self.model),
            "plan": plan_dir,
            "method": config.method,
            "parts": {name: getattr(config, name) for name in _PARTS},
            "config": config.to_dict(),
            "sparsity": {"target": config.sparsity, "planned": summary["sparsity"],
                         "achieved": round(self.zeros / self.total, 6) if self.total else 0.0,
                         "linears": summary["linears"], "parameters": summary["parameters"]},
            "structure": {"pattern": config.pattern or "unstructured", "format": self.format,
                          "quantize": self.quantize},
            "calibration": calibration,
            "model": model,
            "reproduce": [plan_command(config, str(self.model), calib, plan_dir or "PLAN", _ran_in(plan)),
                          shlex.join(self._apply_command(plan_dir or "PLAN"))],
        }

    def _apply_command(self, plan_dir: str) -> list[str]:
        args = ["tamp-fx", "apply", str(self.model), plan_dir, "--out", str(self.out)]
        if self.format != "dense":
            args += ["--format", self.format]
        return args + (["--quantize", self.quantize] if self.quantize else [])

    def write(self, directory: Path) -> None:
        """Write ``tamp-fx.json`` and the card into ``directory`` (the output's temporary): a
        ``README.md`` already there (the input's, copied) gets the section appended."""
        record = self.to_json()
        (directory / PROVENANCE_FILE).write_text(json.dumps(record, indent=1) + "\n")
        card = directory / CARD_FILE
        if card.is_file():
            text = card.read_bytes()
            gap = b"" if not text or text.endswith(b"\n\n") else b"\n" if text.endswith(b"\n") else b"\n\n"
            with card.open("ab") as f:
                f.write(gap + section(record).encode())
        elif not card.exists():
            card.write_text(model_card(record))


def base_model(model: Path) -> str:
    """The model's name for a card's ``base_model``: a Hub id where one is known (the config's
    ``_name_or_path``, or the Hub cache folder it lies in), else its directory's (or file's) name."""
    try:
        name = json.loads((model / "config.json").read_text()).get("_name_or_path", "")
    except (OSError, ValueError, AttributeError):
        name = ""
    if isinstance(name, str) and _HUB_ID.fullmatch(name):
        return name
    # the Hub cache: .../hub/models--ORG--NAME/snapshots/REVISION
    cached = next((p.name for p in model.parents if p.name.startswith("models--")), None)
    if cached:
        return cached.removeprefix("models--").replace("--", "/")
    return model.stem if model.is_file() else model.name


def _ran_in(plan: Plan) -> str | None:
    """The dtype the plan's forward passes ran in, as ``--dtype`` takes it (None: not recorded)."""
    dtype = (plan.timing or {}).get("dtype")
    return dtype if isinstance(dtype, str) and DTYPES.get(dtype) is not None else None   # named, not "auto"


def plan_command(config: PlanConfig, model: str, calib: str, out: str, dtype: str | None = None) -> str:
    """A ``tamp-fx plan`` command line that makes a plan with ``config``, in ``dtype`` where given
    (a machine with another default would otherwise plan in its own); settings the command line
    does not take (set through :class:`PlanConfig`) are named in a trailing comment."""
    defaults = {f.name: f.default for f in dataclasses.fields(PlanConfig)}
    defaults["sequential"] = dataclasses.replace(config, sequential=None).sequential    # what the tokens imply
    custom = config.method == CUSTOM              # not a --method choice: the parts are given instead
    args = ["tamp-fx", "plan", model, "--calib", calib]
    for name in _FLAGS:
        value = getattr(config, name)
        if (value is None or (name == "method" and custom) or (name in _PARTS and not custom)
                or (name not in _ALWAYS and name not in _PARTS and value == defaults[name])):
            continue
        args += ["--" + name.replace("_", "-"), str(value)]
    other = [f"{n}={getattr(config, n)}" for n in defaults if n not in _FLAGS and getattr(config, n) != defaults[n]]
    line = shlex.join([*args, *(["--dtype", dtype] if dtype else []), "--out", out])
    return line + (f"  # and {', '.join(other)} (tamp_fx.PlanConfig)" if other else "")


def read_provenance(directory: Path) -> dict[str, Any]:
    """The record in ``directory / tamp-fx.json``; one line if it is not a JSON object."""
    path = directory / PROVENANCE_FILE
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as error:
        raise TampError(f"{path} is not valid JSON ({first_line(error)}): it is damaged, apply the plan "
                        "again") from error
    if not isinstance(record, dict):
        raise TampError(f"{path} holds a {type(record).__name__}, not an object: it is damaged, apply the plan "
                        "again")
    return record


def describe(record: dict[str, Any]) -> list[tuple[str, str]]:
    """(what, value) rows of a record, for the card's table and ``tamp-fx inspect``; what a
    damaged record lacks shows as None."""
    parts, s, structure, calibration, model = (_dict(record, k) for k in
                                               ("parts", "sparsity", "structure", "calibration", "model"))
    sparsity = ", ".join(f"{k} {_percent(s.get(k))}" for k in ("target", "planned", "achieved"))
    command, reproduce = record.get("command"), record.get("reproduce")
    return [
        ("method", f"{record.get('method')} ({', '.join(f'{k} {v}' for k, v in parts.items())})"),
        ("sparsity", f"{sparsity} of {_number(s.get('parameters'))} decoder linear weights "
                     f"({_number(s.get('linears'))} linears)"),
        ("structure", ", ".join(f"{k} {v}" for k, v in structure.items() if v is not None)),
        ("calibration", f"{calibration.get('file')}: " + ", ".join(f"{k} {_number(v)}" for k, v in calibration.items()
                                                                 if k != "file")),
        ("model", f"{record.get('input_model')} ({model.get('architecture')}), fingerprint {model.get('fingerprint')}"),
        ("plan", str(record.get("plan"))),
        ("written", f"{record.get('date')} by tamp-fx {record.get('tamp_fx_version')}"),
        ("command", shlex.join(map(str, command)) if isinstance(command, list) else str(command)),
        *(("reproduce", str(line)) for line in (reproduce if isinstance(reproduce, list) else [])),
    ]


def _dict(record: dict[str, Any], key: str) -> dict[str, Any]:
    value = record.get(key)
    return value if isinstance(value, dict) else {}


def _percent(value: Any) -> str:
    return f"{value:.2%}" if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)


def _number(value: Any) -> str:
    if isinstance(value, dict):
        return "(" + ", ".join(f"{k} {_number(v)}" for k, v in value.items()) + ")"
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)


def section(record: dict[str, Any]) -> str:
    """The card's ``## Pruning (tamp-fx)`` section: what was pruned, the record's rows, how it loads
    and how to reproduce it."""
    rows = [(what, value) for what, value in describe(record) if what != "reproduce"]
    table = "\n".join(f"| {what} | {value.replace('|', '&#124;')} |" for what, value in rows)
    reproduce = "\n".join(record["reproduce"])
    structure = record["structure"]
    loads = "`from_pretrained` loads this directory as it loads any Hugging Face checkpoint"
    if structure["format"] == "semi-structured":
        loads += (" (dense, in bfloat16; `tamp_fx.prune.semi_structured.load` runs the linears listed in "
                  "`semi_structured.json` with 2:4 sparse kernels on a CUDA GPU)")
    if structure["quantize"]:
        loads += f" (quantized {structure['quantize']} by torchao, which loading needs)"
    return (f"{CARD_SECTION}\n\n{_percent(record['sparsity']['achieved'])} of the weights of the language decoder's "
            f"linears of {record['base_model']} are zero, pruned by tamp-fx {record['tamp_fx_version']} "
            f"(method {record['method']}); pruned weights are stored as zeros, and {loads}. `{PROVENANCE_FILE}` "
            f"beside the weights holds this record, and `tamp-fx inspect DIR` prints it.\n\n"
            f"| | |\n|---|---|\n{table}\n\nTo reproduce (the calibration file is recorded by name):\n\n"
            f"```sh\n{reproduce}\n```\n")


def model_card(record: dict[str, Any]) -> str:
    """A new ``README.md``: Hugging Face metadata (YAML front matter) and :func:`section`."""
    header = (f"---\nbase_model: {json.dumps(record['base_model'])}\nlibrary_name: transformers\n"
              "tags:\n- tamp-fx\n- pruned\n- sparse\n---\n")
    return f"{header}\n# {record['base_model']}, pruned with tamp-fx\n\n{section(record)}"
