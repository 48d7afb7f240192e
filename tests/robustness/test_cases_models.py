"""Damaged models of every kind (Hugging Face folder, GGUF file, .pt2 program) given to every
command that reads a model: each is refused in one line, with nothing written and every input
and its folder as it was (:func:`support.cases.check`). A GGUF whose header sizes are damaged
upwards is refused before a model of those sizes is built (under a memory cap, were it not)."""
from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

from support.cases import TEXT, Case, Workspace, check, params
from support.corrupt import GGUF_SIZES, small_gguf
from support.memory import memory_cap

COMMANDS: dict[str, Callable[[Workspace, Path], list]] = {
    "plan": lambda ws, m: ws.plan_args(m, ws.write("calib.txt", TEXT)),
    "apply": lambda ws, m: ["apply", m, ws.plan(), "--out", ws.out, "-q"],
    "eval": lambda ws, m: ["eval", m, "--text", ws.write("eval.txt", TEXT), "--no-vqa", "--seqlen", 16,
                           "--max-windows", 1, "-q"],
    "export": lambda ws, m: ["export", m, "--calib", ws.write("calib.txt", TEXT), "--out", ws.root / "m.pt2",
                             "--calib-out", ws.root / "i.safetensors", "--nsamples", 2, "--seqlen", 16, "-q"],
    "convert": lambda ws, m: ["convert", m, "--out", ws.out],
}


def _hf(damage: Callable[[Path], object]) -> Callable[[Workspace], Path]:
    """A copy of the tiny llama with ``damage`` done to it."""
    def make(ws: Workspace) -> Path:
        model = ws.copy(ws.model())
        damage(model)
        return model
    return make


def _config(edit: Callable[[dict], object]) -> Callable[[Path], None]:
    def damage(model: Path) -> None:
        config = json.loads((model / "config.json").read_text())
        replaced = edit(config)
        (model / "config.json").write_text(json.dumps(config if replaced is None else replaced))
    return damage


def _replace(name: str, data: bytes | None = None, cut: int | None = None) -> Callable[[Path], None]:
    """``name`` in the model replaced by ``data``, cut to its first ``cut`` bytes, or by a folder (both None)."""
    def damage(model: Path) -> None:
        path = model / name
        old = path.read_bytes()
        path.unlink()
        if data is None and cut is None:
            path.mkdir()
        else:
            path.write_bytes(old[:cut] if cut is not None else data)
    return damage


def _pickled(model: Path) -> None:
    (model / "model.safetensors").rename(model / "pytorch_model.bin")


def _loop(name: str) -> Callable[[Path], None]:
    def damage(model: Path) -> None:
        (model / name).unlink()
        (model / name).symlink_to(model / name)
    return damage


#: damage -> (the model made, what the refusal says, pending)
HF: dict[str, tuple[Callable[[Workspace], Path], str, str | None]] = {
    "missing": (lambda ws: ws.root / "nowhere", "does not exist", None),
    "a symlink loop": (lambda ws: ws.loop("model"), "does not exist", None),
    "an empty file": (lambda ws: ws.write("model", b""), "is a plain file", None),
    "an empty folder": (lambda ws: (ws.root / "model").mkdir() or ws.root / "model", "has no config.json", None),
    "config.json empty": (_hf(_replace("config.json", b"")), "could not read the config", None),
    "config.json truncated": (_hf(_replace("config.json", cut=40)), "could not read the config", None),
    "config.json not UTF-8": (_hf(_replace("config.json", b'{"model_type": "\xff\xfe"}')), "could not read", None),
    "config.json a list": (_hf(_config(lambda c: [c])), "unsupported architecture", None),
    "config.json a folder": (_hf(_replace("config.json")), "has no config.json", None),
    "config.json a symlink loop": (_hf(_loop("config.json")), "has no config.json", None),
    "model_type a number": (_hf(_config(lambda c: c.update(model_type=5))), "unsupported architecture", None),
    "hidden_size huge": (_hf(_config(lambda c: c.update(hidden_size=2 ** 40))), "the config and the weights disagree", None),
    "weights empty": (_hf(_replace("model.safetensors", b"")), "could not load model", None),
    "weights truncated": (_hf(_replace("model.safetensors", cut=1000)), "could not load model", None),
    "weights a folder": (_hf(_replace("model.safetensors")), "model.safetensors", None),
    "only pickled weights": (_hf(_pickled), "only pickled weights", None),
}

CASES: dict[str, Case] = {
    f"{command}/hf/{damage}": Case(lambda ws, c=command, m=make: COMMANDS[c](ws, m(ws)), says, pending=pending)
    for damage, (make, says, pending) in HF.items() for command in ("plan", "apply", "eval", "export")
}


def _gguf_bytes(data: bytes, name: str = "m.gguf") -> Callable[[Workspace], Path]:
    return lambda ws: ws.write(name, data)


def _gguf_version(ws: Workspace) -> Path:
    """A GGUF header whose version is 999."""
    path = small_gguf(ws.root / "m.gguf")
    raw = bytearray(path.read_bytes())
    raw[4:8] = (999).to_bytes(4, "little")
    path.write_bytes(bytes(raw))
    return path


def _gguf_folder(ws: Workspace) -> Path:
    (ws.root / "m.gguf").mkdir()
    return ws.root / "m.gguf"


GGUF: dict[str, tuple[Callable[[Workspace], Path], str]] = {
    "empty": (_gguf_bytes(b""), "is not a GGUF file"),
    "the magic alone": (_gguf_bytes(b"GGUF"), "is the GGUF file complete?"),
    "random bytes after the magic": (_gguf_bytes(b"GGUF" + os.urandom(64)), "is the GGUF file complete?"),
    "an unknown version": (_gguf_version, "is the GGUF file complete?"),
    "upper-case extension": (_gguf_bytes(b"GGUF", "m.GGUF"), "is a .GGUF file"),
    "a folder": (_gguf_folder, "has no config.json"),
}
CASES.update({f"{command}/gguf/{damage}": Case(lambda ws, c=command, m=make: COMMANDS[c](ws, m(ws)), says)
              for damage, (make, says) in GGUF.items() for command in ("plan", "apply", "eval", "convert")})


#: a size of the GGUF header damaged upwards (key after ``llama.`` -> value), its tensors as they were
GGUF_UPWARDS: dict[str, tuple[str, int]] = {
    "embedding_length doubled": ("embedding_length", 2 * GGUF_SIZES["embedding_length"]),
    "embedding_length 2^40": ("embedding_length", 2 ** 40),
    "feed_forward_length doubled": ("feed_forward_length", 2 * GGUF_SIZES["feed_forward_length"]),
    "feed_forward_length 2^40": ("feed_forward_length", 2 ** 40),
    "block_count one more": ("block_count", GGUF_SIZES["block_count"] + 1),
    "block_count 2^40": ("block_count", 2 ** 40),
    "head_count doubled": ("attention.head_count", 2 * GGUF_SIZES["attention.head_count"]),
    "head_count_kv 2^40": ("attention.head_count_kv", 2 ** 40),
    "vocab_size doubled": ("vocab_size", 2 * GGUF_SIZES["vocab_size"]),
    "vocab_size 2^40": ("vocab_size", 2 ** 40),
}
UPWARDS: dict[str, Case] = {
    f"{command}/gguf/{damage}": Case(lambda ws, c=command, k=key, v=value: COMMANDS[c](
        ws, small_gguf(ws.root / "m.gguf", {k: v})), "the header and the tensors disagree")
    for damage, (key, value) in GGUF_UPWARDS.items() for command in ("plan", "apply", "eval", "export", "convert")
}


def _zip_without_a_program(ws: Workspace) -> Path:
    with zipfile.ZipFile(ws.root / "m.pt2", "w") as z:
        z.writestr("archive/notes.txt", "no program here")
    return ws.root / "m.pt2"


def _program_cut(ws: Workspace) -> Path:
    program, _ = ws.program()
    return ws.write("m.pt2", program.read_bytes()[: program.stat().st_size // 2])


PT2: dict[str, tuple[Callable[[Workspace], Path], str, str | None]] = {
    "empty": (_gguf_bytes(b"", "m.pt2"), "m.pt2", None),
    "random bytes": (_gguf_bytes(os.urandom(256), "m.pt2"), "m.pt2", None),
    "a zip without a program": (_zip_without_a_program, "m.pt2", None),
    "cut in half": (_program_cut, "m.pt2", None),
}


def _plan_program(ws: Workspace, model: Path) -> list:
    return ws.plan_args(model, ws.program()[1])


def _apply_program(ws: Workspace, model: Path) -> list:
    return ["apply", model, ws.plan(), "--out", ws.root / "o.pt2", "-q"]


CASES.update({f"{command}/pt2/{damage}": Case(lambda ws, run=run, m=make: run(ws, m(ws)), says, pending=pending)
              for damage, (make, says, pending) in PT2.items()
              for command, run in (("plan", _plan_program), ("apply", _apply_program))})
CASES["eval/pt2/a program"] = Case(lambda ws: COMMANDS["eval"](ws, ws.program()[0]), "only `plan` and `apply` take one")
CASES["export/pt2/a program"] = Case(lambda ws: COMMANDS["export"](ws, ws.program()[0]), "already an exported program")


@pytest.mark.parametrize("case", params(CASES))
def test_a_damaged_model_is_refused_cleanly(case, ws):
    check(CASES[case], ws)


@pytest.mark.parametrize("case", params(UPWARDS))
def test_a_gguf_sized_upwards_is_refused_before_its_model_is_built(case, ws):
    with memory_cap():                 # had the check let it through, building the model fails here at once
        check(UPWARDS[case], ws)
