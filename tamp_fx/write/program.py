"""An exported program written with the plan's masks applied (``.pt2``), optionally PT2E-quantized."""
from __future__ import annotations

import io
import logging
import warnings
from pathlib import Path

import torch
from torch.export import Dim, ExportedProgram

from tamp_fx.artifact.plan import Plan
from tamp_fx.calibrate.program import load_program_calibration
from tamp_fx.capture.graph import linear_nodes
from tamp_fx.errors import TampError, first_line
from tamp_fx.load.fingerprint import fingerprint_sample
from tamp_fx.runtime.transaction import atomic_file

log = logging.getLogger(__name__)


class _Sink(io.RawIOBase):
    """The file torch's archive writer writes a ``.pt2`` through, which never lets an error reach
    it: PyTorchFileWriter is C++, and an exception it meets (a full disk) ends in ``terminate``
    when its destructor writes again, so the first OSError is kept in :attr:`error` and every
    later call is a no-op."""

    def __init__(self, file: io.BufferedWriter) -> None:
        super().__init__()
        self.file, self.error = file, None

    def _guarded(self, call, *args):
        if self.error is None:
            try:
                return call(*args)
            except OSError as error:
                self.error = error
        return None

    def write(self, data) -> int:
        self._guarded(self.file.write, data)
        return memoryview(data).nbytes

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._guarded(self.file.seek, offset, whence) or 0

    def flush(self) -> None:
        self._guarded(self.file.flush)

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True


def save_program(program: ExportedProgram, path: Path) -> None:
    """``torch.export.save(program, path)``, with a write that fails (a full disk) raised here
    as its OSError rather than aborting the process in torch's C++ writer."""
    with open(path, "wb") as file:
        sink = _Sink(file)
        torch.export.save(program, sink)
        sink.flush()
    if sink.error is not None:
        raise sink.error


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
                            "it serves inputs shaped like calibration sample 0 only", first_line(error, limit=200))
        try:
            return torch.export.export(gm, args, strict=False)
        except Exception as error:  # noqa: BLE001
            raise TampError(f"torch.export could not re-export the quantized program: {first_line(error, limit=200)}") from error


def apply_program(ep: ExportedProgram, plan: Plan, out: Path, where: str | Path, *, overwrite: bool = False,
                  protect: tuple[Path, ...] = (), quantize: str | None = None, calib: str | Path | None = None) -> Path:
    """Write ``ep`` (read from ``where``) with the plan's masks applied to the ``.pt2`` file ``out``.

    The plan must prune linear weights of ``ep`` (:meth:`Plan.check_model`); without ``quantize``
    the pruned weights (:meth:`Plan.pruned`) replace the program's own (signature and dynamic
    shapes kept). With ``quantize="pt2e-x86"`` the pruned graph is quantized
    (:func:`tamp_fx.write.quantize.quantize_graph_pt2e`) on the samples of ``calib`` and
    re-exported (the symbolic input dimensions of ``ep`` kept where torch.export allows); loading
    the result needs ``quantized_decomposed`` ops registered (``import torchao.quantization.pt2e``;
    :func:`tamp_fx.load.program.load_program` does it).
    """
    out = Path(out)
    if out.suffix != ".pt2":
        raise TampError(f"an exported program is written to a .pt2 file, got --out {out}: pass e.g. --out pruned.pt2")
    gm = ep.module()
    linears = {str(w.target) for w in (n.args[1] for n in linear_nodes(gm))
               if isinstance(w, torch.fx.Node) and w.op == "get_attr"}          # the weights the linears read
    plan.check_model({n: fingerprint_sample(ep.state_dict[n]) for n in plan.linears if n in linears and n in ep.state_dict},
                     where)
    samples = None
    if quantize is not None:
        if calib is None:
            raise TampError("--quantize pt2e-x86 calibrates activations: pass --calib inputs.safetensors")
        from tamp_fx.write.quantize import require_torchao
        require_torchao()
        samples = load_program_calibration(calib, plan.config.nsamples)
    for name in plan.masks:
        weight = ep.state_dict[name]
        pruned = plan.pruned(name, weight.detach())
        ep.state_dict[name] = torch.nn.Parameter(pruned, requires_grad=weight.requires_grad)   # the program as saved
        owner, _, attr = name.rpartition(".")
        setattr(gm.get_submodule(owner), attr, torch.nn.Parameter(pruned, requires_grad=False))  # what pt2e quantizes
    program = ep
    if samples is not None:
        from tamp_fx.write.quantize import quantize_graph_pt2e
        converted = quantize_graph_pt2e(gm, samples[0].args, calibration=[s.args for s in samples[1:]])
        _drop_unused_parameters(converted)
        program = _reexport(converted, samples[0].args, _dynamic_shapes(ep))
    with atomic_file(out, overwrite=overwrite, protect=protect) as tmp:
        save_program(program, tmp)
    return out
