"""Exported programs (``torch.export.save``, ``.pt2``) as models to plan and apply.

A program is any module whose linears are ``aten.linear`` nodes with parameter weights, such
as a language decoder exported with ``torch.export.export``. Plan keys are the program's
parameter names (``ep.state_dict``), e.g. ``layers.0.self_attn.q_proj.weight``.

Planning a program goes through the same layer-by-layer driver as a Hugging Face model: its
decoder layers are found by structure (:mod:`tamp_fx.program`), the inputs of the first are
captured on every calibration sample, and each layer is profiled, allocated and pruned on the
pruned outputs of the one before. Every method works; ECoFLaP's loss is the next-token loss of
the program's logits (:func:`program_loss`).

Calibration inputs (``--calib inputs.safetensors``), one safetensors file:

* ``sample.{i}.arg.{j}``: the j-th positional input of sample i (i = 0, 1, ...; every sample
  has the same number of inputs, j = 0, 1, ...); keyword inputs are not supported;
* ``sample.{i}.labels`` (optional): int8 modality label of every token (0 text, 1 image,
  2 video, 3 audio), shaped like the token dimensions of the inputs, e.g. (N,) or (B, N),
  flattened in token order; missing means all text;
* ``sample.{i}.targets`` (optional): int64 next-token target of every token (-100: none), for
  ECoFLaP's loss when the program's first input is not the token ids (``tamp-fx export``
  writes them).

:func:`save_program_calibration` writes one. Loading never runs code from the file: the
archive is refused if it holds pickled non-tensor objects, and every tensor pickle in it is
read with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import json
import logging
import pickle
import re
import warnings
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.export import Dim, ExportedProgram

from tamp_fx.artifact import Plan
from tamp_fx.errors import TampError, first_line
from tamp_fx.graph import linear_nodes
from tamp_fx.model_io import atomic_file
from tamp_fx.passes.base import DECISION_KEY
from tamp_fx.passes.plan import LinearDecision
from tamp_fx.passes.rewrite import rewrite

log = logging.getLogger(__name__)

_SAMPLE_KEY = re.compile(r"sample\.(\d+)\.(?:arg\.(\d+)|(labels|targets))")


# --- calibration inputs -------------------------------------------------------------------

@dataclass(frozen=True)
class ProgramSample:
    """One calibration call of a program: ``program(*args)``, with per-token modality labels."""

    args: tuple[torch.Tensor, ...]
    labels: torch.Tensor | None = None       # int8, one per token; None: every token is text
    targets: torch.Tensor | None = None      # int64 next-token targets, one per token (-100: none)


def save_program_calibration(path: str | Path, samples: Sequence[ProgramSample]) -> Path:
    """Write ``samples`` in the ``--calib`` layout of an exported program (module docstring).

    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "calib.safetensors"
    >>> s = ProgramSample((torch.arange(4)[None],), torch.tensor([0, 1, 1, 0], dtype=torch.int8))
    >>> [x.args[0].tolist() for x in load_program_calibration(save_program_calibration(p, [s, s]))]
    [[[0, 1, 2, 3]], [[0, 1, 2, 3]]]
    """
    tensors = {}
    for i, sample in enumerate(samples):
        for j, arg in enumerate(sample.args):
            tensors[f"sample.{i}.arg.{j}"] = arg.detach().cpu().clone()  # clone: safetensors refuses shared memory
        if sample.labels is not None:
            tensors[f"sample.{i}.labels"] = sample.labels.detach().cpu().to(torch.int8).clone()
        if sample.targets is not None:
            tensors[f"sample.{i}.targets"] = sample.targets.detach().cpu().long().clone()
    save_file(tensors, Path(path), metadata={"format": "tamp-fx program calibration v1"})
    return Path(path)


def load_program_calibration(path: str | Path, nsamples: int | None = None) -> list[ProgramSample]:
    """The first ``nsamples`` (all when None) samples of a ``--calib`` file for a program."""
    path = Path(path).expanduser()
    hint = "write sample.{i}.arg.{j} tensors (and optional sample.{i}.labels) with tamp_fx.exported.save_program_calibration"
    if path.suffix != ".safetensors" or not path.is_file():
        raise TampError(f"calibration for an exported program must be an existing .safetensors file, got {path}: {hint}")
    args: dict[int, dict[int, torch.Tensor]] = {}
    labels: dict[int, torch.Tensor] = {}
    targets: dict[int, torch.Tensor] = {}
    try:
        with safe_open(path, "pt") as f:
            for key in f.keys():
                match = _SAMPLE_KEY.fullmatch(key)
                if match is None:
                    raise TampError(f"calibration file {path} has an unexpected tensor {key!r}: {hint}")
                i = int(match[1])
                if match[3] == "labels":
                    labels[i] = f.get_tensor(key).to(torch.int8)
                elif match[3] == "targets":
                    targets[i] = f.get_tensor(key).long()
                else:
                    args.setdefault(i, {})[int(match[2])] = f.get_tensor(key)
    except SafetensorError as error:
        raise TampError(f"calibration file {path} is not a readable safetensors file ({error}): {hint}") from error
    if not args:
        raise TampError(f"calibration file {path} has no samples: {hint}")
    n_args = len(args[min(args)])
    for i in range(len(args)):
        if i not in args or sorted(args[i]) != list(range(n_args)):
            raise TampError(f"calibration file {path}: sample {i} is missing or does not have arguments "
                            f"0..{n_args - 1} like the others: {hint}")
    for kind, extra in (("labels", labels), ("targets", targets)):
        if set(extra) - set(args):
            raise TampError(f"calibration file {path} has {kind} for sample {min(set(extra) - set(args))}, which has no arguments")
    count = len(args) if nsamples is None else min(nsamples, len(args))
    return [ProgramSample(tuple(args[i][j] for j in range(n_args)), labels.get(i), targets.get(i)) for i in range(count)]


# --- safe loading -------------------------------------------------------------------------

def _scan_archive(path: Path) -> bool:
    """Refuse archives with pickled non-tensor constants; return whether the program uses
    ``quantized_decomposed`` ops (a pt2e-quantized program), which must be registered first."""
    from torch.export.pt2_archive.constants import CUSTOM_OBJ_FILENAME_PREFIX, OPAQUE_OBJ_FILENAME_PREFIX
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as error:
        raise TampError(f"{path} is not an exported program ({error}): write it with torch.export.save") from error
    with archive:
        names = archive.namelist()
        for name in (n for n in names if n.endswith("constants_config.json")):
            for fqn, payload in json.loads(archive.read(name)).get("config", {}).items():
                if str(payload.get("path_name", "")).startswith((CUSTOM_OBJ_FILENAME_PREFIX, OPAQUE_OBJ_FILENAME_PREFIX)):
                    raise TampError(f"{path} holds a pickled object constant {fqn!r}: tamp-fx does not load "
                                    "pickles, which can run code; export a program whose constants are tensors")
        return any(b"quantized_decomposed" in archive.read(n) for n in names if "/models/" in n and n.endswith(".json"))


@contextlib.contextmanager
def _weights_only_torch_load() -> Iterator[None]:
    """Make every ``torch.load`` inside the block ``weights_only=True`` (torch.export.load
    otherwise unpickles weights and example inputs with ``weights_only=False``)."""
    original = torch.load

    @functools.wraps(original)
    def load(*args, **kwargs):
        kwargs["weights_only"] = True
        return original(*args, **kwargs)

    torch.load = load
    try:
        yield
    finally:
        torch.load = original


def _short(error: BaseException, limit: int = 200) -> str:
    text = first_line(error)
    return text if len(text) <= limit else text[:limit] + "..."


def load_program(path: str | Path) -> ExportedProgram:
    """``torch.export.load(path)`` without running code from the file (module docstring)."""
    path = Path(path)
    if _scan_archive(path):  # register the quantized_decomposed ops (torchao's, else torch's own)
        try:
            importlib.import_module("torchao.quantization.pt2e")
        except ImportError:
            importlib.import_module("torch.ao.quantization.fx._decomposed")
    export_log = logging.getLogger("torch.export")
    level = export_log.level
    export_log.setLevel(logging.ERROR)  # a failed load logs a long traceback as a warning, then raises
    try:
        with _weights_only_torch_load(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.export.load(path)
    except pickle.UnpicklingError as error:
        why = next((line.split("error:", 1)[1].split(". ")[0].strip() for line in str(error).splitlines()
                    if "WeightsUnpickler error:" in line), _short(error, 120))
        raise TampError(f"{path} holds pickled data that is not plain tensors ({why}): tamp-fx loads pickles "
                        "only with torch.load(weights_only=True), which refuses it; export a program of plain tensors"
                        ) from error
    except Exception as error:  # noqa: BLE001 - one line for the user, the cause chained
        raise TampError(f"could not load exported program {path} ({_short(error)}): write it with "
                        f"torch.export.save from this torch ({torch.__version__})") from error
    finally:
        export_log.setLevel(level)


# --- ECoFLaP's loss ---------------------------------------------------------------------

_LOSS_HINT = ("ecoflap on an exported program needs its next-token loss: a program returning logits (1, N, V) "
              "whose first input is the token ids, or calibration targets sample.{i}.targets (tamp-fx export "
              "writes them); use another method for this program")


def _targets(sample: ProgramSample) -> torch.Tensor | None:
    """Next-token targets (N,) of a sample: its ``targets``, else its token ids on text tokens."""
    if sample.targets is not None:
        return sample.targets.reshape(-1).long()
    ids = sample.args[0] if sample.args else None
    if ids is None or ids.is_floating_point() or ids.dim() != 2 or ids.shape[0] != 1:
        return None
    targets = ids[0].long().clone()                                     # (N,)
    if sample.labels is not None:
        targets[sample.labels.reshape(-1) != 0] = -100                 # modality placeholders are no targets
    return targets


def program_loss(gm: torch.nn.Module, samples: Sequence[ProgramSample]):
    """ECoFLaP's loss for a program (``ep.module()``): the next-token cross entropy of its output
    taken as logits (1, N, V), on the targets of :func:`_targets` (as the Hugging Face loss:
    logits in float32, position t predicts target t+1, -100 ignored). Refused in one line for
    a program without targets or logits."""
    if any(_targets(s) is None for s in samples):
        raise TampError(_LOSS_HINT)

    def loss(sample: ProgramSample, params) -> float:
        out = torch.func.functional_call(gm, dict(params), args=tuple(sample.args))
        logits = out[0] if isinstance(out, (tuple, list)) else out
        targets = _targets(sample)
        if not (isinstance(logits, torch.Tensor) and logits.is_floating_point() and logits.dim() == 3
                and logits.shape[:2] == (1, targets.numel()) and int(targets.max()) < logits.shape[-1]):
            raise TampError(_LOSS_HINT)
        return float(torch.nn.functional.cross_entropy(logits[0, :-1].float(), targets[1:], ignore_index=-100))
    return loss


# --- apply --------------------------------------------------------------------------------

def program_weights(ep: ExportedProgram, names) -> dict[str, torch.Tensor]:
    """The program's tensors of those ``names`` it has (for the plan's fingerprint check)."""
    return {n: ep.state_dict[n] for n in names if n in ep.state_dict}


def _dynamic_shapes(ep: ExportedProgram) -> tuple | None:
    """Per positional input of ``ep``, its symbolic dimensions as ``Dim.AUTO`` (None: all static)."""
    user_inputs = set(ep.graph_signature.user_inputs)
    specs = []
    for node in ep.graph.nodes:
        if node.op == "placeholder" and node.name in user_inputs:
            val = node.meta.get("val")
            shape = getattr(val, "shape", ())
            specs.append({d: Dim.AUTO for d, s in enumerate(shape) if not isinstance(s, int)} or None)
    return tuple(specs) if any(specs) else None


def _drop_unused_parameters(gm: torch.fx.GraphModule) -> None:
    """Remove parameters no ``get_attr`` node reads (the float weights pt2e folded into int8)."""
    used = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    for name, _ in list(gm.named_parameters()):
        if name not in used:
            owner, _, attr = name.rpartition(".")
            delattr(gm.get_submodule(owner), attr)


def _reexport(gm: torch.fx.GraphModule, args: tuple, dynamic: tuple | None) -> ExportedProgram:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if dynamic is not None:
            try:
                return torch.export.export(gm, args, dynamic_shapes=dynamic, strict=False)
            except Exception as error:  # noqa: BLE001 - fall back to the calibration shapes
                log.warning("re-exporting the quantized program with dynamic shapes failed (%s): "
                            "it serves inputs shaped like calibration sample 0 only", _short(error))
        try:
            return torch.export.export(gm, args, strict=False)
        except Exception as error:  # noqa: BLE001
            raise TampError(f"torch.export could not re-export the quantized program: {_short(error)}") from error


def apply_program(ep: ExportedProgram, plan_: Plan, out: Path, *, overwrite: bool = False, protect: tuple[Path, ...] = (),
                  quantize: str | None = None, calib: str | Path | None = None) -> Path:
    """Write ``ep`` with the plan's masks applied to the ``.pt2`` file ``out``.

    The masks go through the rewrite pass on ``ep.module()``; without ``quantize`` the masked
    weights replace the program's own (signature and dynamic shapes kept). With
    ``quantize="pt2e-x86"`` the rewritten graph is quantized (:func:`tamp_fx.quantize.quantize_graph_pt2e`)
    on the samples of ``calib`` and re-exported (the symbolic input dimensions of ``ep`` kept
    where torch.export allows); loading the result needs ``quantized_decomposed`` ops
    registered (``import torchao.quantization.pt2e``; :func:`load_program` does it).
    The caller checks first that the plan was made for ``ep`` (fingerprint).
    """
    out = Path(out)
    if out.suffix != ".pt2":
        raise TampError(f"an exported program is written to a .pt2 file, got --out {out}: pass e.g. --out pruned.pt2")
    if quantize not in (None, "pt2e-x86"):
        raise TampError(f"--quantize {quantize} quantizes a Hugging Face model: for an exported program use --quantize pt2e-x86")
    samples = None
    if quantize is not None:
        if calib is None:
            raise TampError("--quantize pt2e-x86 calibrates activations: pass --calib inputs.safetensors")
        from tamp_fx.quantize import _require_torchao
        _require_torchao()
        samples = load_program_calibration(calib, plan_.config.nsamples)
    gm = ep.module()
    found = set()
    for node in linear_nodes(gm):
        weight = node.args[1]
        name = str(weight.target) if isinstance(weight, torch.fx.Node) and weight.op == "get_attr" else None
        if name in plan_.masks:
            lp = plan_.linears[name]
            node.meta[DECISION_KEY] = LinearDecision(weight=name, target_sparsity=lp.target_sparsity, sparsity=lp.sparsity,
                                                     group=lp.group, mask=plan_.masks[name],
                                                     new_weight=plan_.weights.get(name), pattern=lp.pattern)
            found.add(name)
    if set(plan_.masks) - found:
        raise TampError(f"the plan prunes {sorted(set(plan_.masks) - found)[0]}, which is no linear weight of the "
                        "exported program: the plan was made for another model")
    rewrite(gm)
    if samples is None:
        for name in plan_.masks:
            ep.state_dict[name] = torch.nn.Parameter(gm.get_parameter(name).detach(),
                                                     requires_grad=ep.state_dict[name].requires_grad)
        program = ep
    else:
        from tamp_fx.quantize import quantize_graph_pt2e
        converted = quantize_graph_pt2e(gm, samples[0].args, calibration=[s.args for s in samples[1:]])
        _drop_unused_parameters(converted)
        program = _reexport(converted, samples[0].args, _dynamic_shapes(ep))
    with atomic_file(out, overwrite=overwrite, protect=protect) as tmp:
        torch.export.save(program, tmp)
    return out
