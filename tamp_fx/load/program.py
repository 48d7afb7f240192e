"""Exported programs (``torch.export.save``, ``.pt2``) loaded without running code from the file:
the archive is refused if it holds pickled non-tensor objects, and every tensor pickle in it is
read with ``torch.load(weights_only=True)``.

A program is any module whose linears are ``aten.linear`` nodes with parameter weights, such
as a language decoder exported with ``torch.export.export``. Plan keys are the program's
parameter names (``ep.state_dict``), e.g. ``layers.0.self_attn.q_proj.weight``. Its decoder
layers are found by structure (:mod:`tamp_fx.capture.program`) and planned by the same
layer-by-layer pipeline as a Hugging Face model.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import json
import logging
import pickle
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.export import ExportedProgram

from tamp_fx.errors import TampError, first_line

log = logging.getLogger(__name__)


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
                    if "WeightsUnpickler error:" in line), first_line(error, limit=120))
        raise TampError(f"{path} holds pickled data that is not plain tensors ({why}): tamp-fx loads pickles "
                        "only with torch.load(weights_only=True), which refuses it; export a program of plain tensors"
                        ) from error
    except Exception as error:  # noqa: BLE001 - one line for the user, the cause chained
        raise TampError(f"could not load exported program {path} ({first_line(error, limit=200)}): write it with "
                        f"torch.export.save from this torch ({torch.__version__})") from error
    finally:
        export_log.setLevel(level)


