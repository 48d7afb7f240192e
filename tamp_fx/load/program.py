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
    """Check the archive (every member's CRC, :func:`_check_payloads`) and refuse pickled non-tensor
    constants; return whether the program uses ``quantized_decomposed`` ops (a pt2e-quantized
    program), which must be registered first."""
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()               # reads every member: flipped bytes fail their CRC
            if damaged is not None:
                raise TampError(f"exported program {path} is damaged ({damaged} fails its CRC check): "
                                "write it again with torch.export.save")
            names = archive.namelist()
            for name in (n for n in names if n.endswith(("constants_config.json", "weights_config.json"))):
                _check_payloads(archive, name, path)
            return any(b"quantized_decomposed" in archive.read(n) for n in names
                       if "/models/" in n and n.endswith(".json"))
    except TampError:
        raise
    except Exception as error:  # noqa: BLE001 - BadZipFile, zlib.error, OSError, JSON and UTF-8 errors, ...
        raise TampError(f"{path} is not an exported program or is damaged ({first_line(error, limit=120)}): "
                        "write it with torch.export.save") from error


def _check_payloads(archive: zipfile.ZipFile, name: str, path: Path) -> None:
    """Check one payload config (``*_weights_config.json`` or ``*_constants_config.json``): a JSON object
    of entries, no pickled object constant, and every tensor's file as long as its shape and dtype
    need (torch.export.load reads an empty one as zeros and a short one fails deep inside torch)."""
    from torch._export.serde.schema import ScalarType
    from torch._export.serde.serialize import deserialize_scalar_type
    from torch.export.pt2_archive.constants import CUSTOM_OBJ_FILENAME_PREFIX, OPAQUE_OBJ_FILENAME_PREFIX
    config, members = json.loads(archive.read(name)), set(archive.namelist())
    entries = config.get("config") if isinstance(config, dict) else None
    if not isinstance(entries, dict) or not all(isinstance(v, dict) for v in entries.values()):
        raise TampError(f"exported program {path} has a damaged {name}: write it again with torch.export.save")
    for fqn, payload in entries.items():
        if str(payload.get("path_name", "")).startswith((CUSTOM_OBJ_FILENAME_PREFIX, OPAQUE_OBJ_FILENAME_PREFIX)):
            raise TampError(f"{path} holds a pickled object constant {fqn!r}: tamp-fx does not load "
                            "pickles, which can run code; export a program whose constants are tensors")
        meta = payload.get("tensor_meta")
        if payload.get("use_pickle") or not isinstance(meta, dict):
            continue
        sizes = [d.get("as_int") for d in meta.get("sizes", [])]
        strides = [d.get("as_int") for d in meta.get("strides", [])]
        offset = (meta.get("storage_offset") or {}).get("as_int", 0)
        if not all(type(n) is int for n in (*sizes, *strides, offset)):
            continue                                  # symbolic: torch checks it
        itemsize = deserialize_scalar_type(ScalarType(meta.get("dtype"))).itemsize
        need = 0 if 0 in sizes else (offset + sum((s - 1) * t for s, t in zip(sizes, strides)) + 1) * itemsize
        member = f"{name.rpartition('/')[0]}/{payload.get('path_name')}"
        held = archive.getinfo(member).file_size if member in members else None
        if held is None or held < need:
            raise TampError(f"exported program {path} is damaged: {fqn} needs {need} bytes of {member}, which "
                            f"{'is missing' if held is None else f'holds {held}'}; write it again with "
                            "torch.export.save")


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


