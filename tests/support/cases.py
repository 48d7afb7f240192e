"""The robustness suite's case tables: a :class:`Case` builds damaged inputs in a
:class:`Workspace` and returns the command to run; :func:`check` runs it and asserts a clean
refusal (:func:`support.snapshot.assert_refused`) over a snapshot of every input, its folder and
the output's parent."""
from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from support.cli import invoke
from support.snapshot import around, assert_refused, snapshot

TEXT = "the quick brown fox jumps over the lazy dog. " * 60       # a few hundred tokens of any tiny tokenizer
TURNS = [{"from": "human", "value": "<image>\nWhat colour is the square?"}, {"from": "gpt", "value": "red"}]
@dataclass(frozen=True)
class Case:
    """``make(ws)`` builds the damaged inputs and returns the arguments of ``tamp-fx``; the
    refusal has exit status ``exit`` and its line contains ``says``. ``pending``: a known gap
    another change closes (the case is a strict xfail until then)."""
    make: Callable[[Workspace], list]
    says: str
    exit: int = 1
    pending: str | None = None


def params(table: dict[str, Case]) -> list:
    """The table's names as pytest parameters, the pending ones as strict xfails."""
    return [pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=case.pending) if case.pending else ())
            for name, case in table.items()]


class Workspace:
    """A test's folder (``root``, with ``out`` the output) and the session's tiny models, plan and
    exported program; every session path used is watched as well as ``root``."""

    def __init__(self, root: Path, request: pytest.FixtureRequest):
        self.root, self.out, self._request, self._used = root, root / "out", request, []

    def _watch(self, path: Path) -> Path:
        self._used.append(path)
        return path

    def model(self, family: str = "llama") -> Path:
        return self._watch(self._request.getfixturevalue("tiny_models")(family))

    def plan(self) -> Path:
        return self._watch(self._request.getfixturevalue("saved_plan"))

    def program(self) -> tuple[Path, Path]:
        """The tiny llama exported: (model.pt2, inputs.safetensors)."""
        program, inputs = self._request.getfixturevalue("program")
        return self._watch(program), self._watch(inputs)

    def copy(self, source: Path, name: str = "model") -> Path:
        """A copy of ``source`` (a folder) in ``root`` that a case may damage."""
        return Path(shutil.copytree(source, self.root / name))

    def write(self, name: str, data: str | bytes) -> Path:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data if isinstance(data, bytes) else data.encode())
        return path

    def jsonl(self, *records: Any, name: str = "calib.jsonl") -> Path:
        return self.write(name, "".join(json.dumps(r) + "\n" for r in records))

    def loop(self, name: str) -> Path:
        """A symbolic link to itself."""
        path = self.root / name
        path.symlink_to(path)
        return path

    def plan_args(self, model: Path, calib: Path, *extra, out: Path | None = None) -> list:
        return ["plan", model, "--calib", calib, "--out", out or self.out, "--nsamples", 2, "--seqlen", 16, "-q", *extra]

    def watched(self) -> list[Path]:
        return [self.root, *self._used, *around(*self._used)]


def check(case: Case, ws: Workspace) -> None:
    args = case.make(ws)
    roots = ws.watched()
    before = snapshot(*roots)
    result = invoke(args)
    assert_refused(result, before, snapshot(*roots), exit=case.exit, says=case.says)
