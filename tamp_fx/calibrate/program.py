"""Calibration inputs of an exported program (``--calib inputs.safetensors``), one safetensors file:

* ``sample.{i}.arg.{j}``: the j-th positional input of sample i (i = 0, 1, ...; every sample
  has the same number of inputs, j = 0, 1, ...); keyword inputs are not supported;
* ``sample.{i}.labels`` (optional): int8 modality label of every token (0 text, 1 image,
  2 video, 3 audio), shaped like the token dimensions of the inputs, e.g. (N,) or (B, N),
  flattened in token order; missing means all text;
* ``sample.{i}.targets`` (optional): int64 next-token target of every token (-100: none), for
  ECoFLaP's loss when the program's first input is not the token ids (``tamp-fx export``
  writes them).

:func:`save_program_calibration` writes one.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from tamp_fx.calibrate.files import checked_file
from tamp_fx.errors import TampError

log = logging.getLogger(__name__)

HINT = ("write sample.{i}.arg.{j} tensors (and optional sample.{i}.labels) with "
        "tamp_fx.calibrate.program.save_program_calibration")

_SAMPLE_KEY = re.compile(r"sample\.(\d+)\.(?:arg\.(\d+)|(labels|targets))")


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


def program_calibration_file(path: str | Path) -> Path:
    """``path`` if it is a regular, non-empty ``.safetensors`` file; else one line saying what a program's --calib is."""
    path = Path(path).expanduser()
    if path.suffix.lower() != ".safetensors":
        raise TampError(f"calibration for an exported program must be a .safetensors file, got {path}: {HINT}")
    return checked_file(path, "calibration file", HINT)


def load_program_calibration(path: str | Path, nsamples: int | None = None) -> list[ProgramSample]:
    """The first ``nsamples`` (all when None) samples of a ``--calib`` file for a program."""
    path, hint = program_calibration_file(path), HINT
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


