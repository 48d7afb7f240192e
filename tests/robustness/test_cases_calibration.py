"""Damaged calibration and evaluation data of every kind (plain text, JSONL, JSON, the images,
audio and video a conversation names, a program's .safetensors inputs) given to every command
that reads it: each is refused in one line, with nothing written and every input and its
folder as it was (:func:`support.cases.check`)."""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from support.cases import TEXT, TURNS, Case, Workspace, check, params
from support.corrupt import deeply_nested_json, wav

# --- plain text: plan, export and eval --text ---------------------------------------------

TEXT_COMMANDS: dict[str, Callable[[Workspace, Path], list]] = {
    "plan": lambda ws, t: ws.plan_args(ws.model(), t),
    "export": lambda ws, t: ["export", ws.model(), "--calib", t, "--out", ws.root / "m.pt2", "--calib-out",
                             ws.root / "i.safetensors", "--nsamples", 2, "--seqlen", 16, "-q"],
    "eval": lambda ws, t: ["eval", ws.model(), "--text", t, "--no-vqa", "--seqlen", 16, "-q"],
}


def _fifo(ws: Workspace) -> Path:
    os.mkfifo(ws.root / "text.txt")
    return ws.root / "text.txt"


def _folder(ws: Workspace) -> Path:
    (ws.root / "text.txt").mkdir()
    return ws.root / "text.txt"


#: damage -> (the text file made, what the refusal says)
TEXTS: dict[str, tuple[Callable[[Workspace], Path], str]] = {
    "missing": (lambda ws: ws.root / "none.txt", "does not exist"),
    "empty": (lambda ws: ws.write("text.txt", b""), "is empty"),
    "a folder": (_folder, "is a directory"),
    "a symlink loop": (lambda ws: ws.loop("text.txt"), "cannot be read"),
    "a FIFO": (_fifo, "is a FIFO, not a regular file"),
    "random bytes": (lambda ws: ws.write("text.txt", b"\x00\x01" + os.urandom(200)), "looks binary"),
    "a safetensors file": (lambda ws: ws.write("text.txt", (ws.model() / "model.safetensors").read_bytes()),
                           "looks binary"),
    "Latin-1, not UTF-8": (lambda ws: ws.write("text.txt", ("café " * 200).encode("latin-1")), "not UTF-8"),
    "too short for --seqlen": (lambda ws: ws.write("text.txt", "a few words"), "tokens"),
}
CASES: dict[str, Case] = {f"{command}/text/{damage}": Case(lambda ws, c=command, m=make: TEXT_COMMANDS[c](ws, m(ws)), says)
                          for damage, (make, says) in TEXTS.items() for command in TEXT_COMMANDS}
CASES["plan/text/blank"] = Case(lambda ws: ws.plan_args(ws.model(), ws.write("t.txt", " \n\t\n" * 50)), "has no text")
CASES["plan/text/conversations named .txt"] = Case(
    lambda ws: ws.plan_args(ws.model(), ws.write("t.txt", json.dumps({"conversations": TURNS}))), "name it .json")

# --- conversations: plan and export on the tiny llava ---------------------------------------


def _conversations(make: Callable[[Workspace], Path], family: str = "llava"):
    """Commands reading the conversations ``make`` writes, images copied beside them."""
    def commands(ws: Workspace) -> dict[str, list]:
        model = ws.model(family)
        if family == "llava":
            shutil.copytree(model / "images", ws.root / "images")
        calib = make(ws)
        return {"plan": ws.plan_args(model, calib),
                "export": ["export", model, "--calib", calib, "--out", ws.root / "m.pt2", "--calib-out",
                           ws.root / "i.safetensors", "--nsamples", 2, "-q"]}
    return commands


def _record(**media) -> dict:
    return {**media, "conversations": TURNS}


GOOD = _record(image="images/0.png")

#: damage -> (the conversations made, what the refusal says)
JSONL: dict[str, tuple[Callable[[Workspace], Path], str]] = {
    "a record that is a list": (lambda ws: ws.jsonl(GOOD, [GOOD]), 'has no "conversations" list'),
    "conversations a string": (lambda ws: ws.jsonl({"conversations": "hi"}), 'has no "conversations" list'),
    "conversations empty": (lambda ws: ws.jsonl({"conversations": []}), 'has no "conversations" list'),
    "a line that is a number": (lambda ws: ws.jsonl(GOOD, 7), 'has no "conversations" list'),
    "a line cut short": (lambda ws: ws.write("calib.jsonl", json.dumps(GOOD) + "\n" + json.dumps(GOOD)[:30]),
                         "line 2"),
    "upper-case .JSONL, a line cut short": (lambda ws: ws.write("c.JSONL", json.dumps(GOOD)[:30]), "line 1"),
    "blank lines only": (lambda ws: ws.write("calib.jsonl", "\n \n\n"), "holds no conversations"),
    "a number of 5,000 digits": (lambda ws: ws.write("calib.jsonl", '{"image": ' + "9" * 5000 + "}\n"),
                                 "not valid JSONL"),
    "images an object": (lambda ws: ws.jsonl(_record(images={"a": "images/0.png"})), '"images" must be a file path'),
    "an empty image path": (lambda ws: ws.jsonl(_record(image="")), '"image" must be a file path'),
    "an image that is a folder": (lambda ws: ws.jsonl(_record(image="images")), "missing file"),
    "an image that is a symlink loop": (lambda ws: ws.loop("loop.png") and ws.jsonl(_record(image="loop.png")),
                                        "cannot be resolved"),
    "an empty image": (lambda ws: ws.write("e.png", b"") and ws.jsonl(_record(image="e.png")), "cannot be read"),
    "a PNG cut short": (lambda ws: ws.write("c.png", (ws.root / "images/0.png").read_bytes()[:60])
                        and ws.jsonl(_record(image="c.png")), "cannot be read"),
    "audio for a model without audio": (lambda ws: wav(ws.root / "a.wav") and ws.jsonl(_record(audio="a.wav")),
                                        "takes no audio"),
    "a video for a model without video": (lambda ws: ws.jsonl(_record(video=["images/0.png", "images/1.png"])),
                                          "has a video, but"),
    "a missing video": (lambda ws: ws.jsonl(_record(video="clip.mp4")), "missing file"),
}
JSON: dict[str, tuple[Callable[[Workspace], Path], str]] = {
    "an object, not a list": (lambda ws: ws.write("calib.json", json.dumps(GOOD)), "holds no conversations"),
    "a number": (lambda ws: ws.write("calib.json", "3"), "holds no conversations"),
    "an empty list": (lambda ws: ws.write("calib.json", "[]"), "holds no conversations"),
    "a list of strings": (lambda ws: ws.write("calib.json", '["a", "b"]'), 'has no "conversations" list'),
    "two documents": (lambda ws: ws.write("calib.json", json.dumps([GOOD]) * 2), "name it .jsonl"),
    "a trailing comma": (lambda ws: ws.write("calib.json", json.dumps([GOOD])[:-1] + ",]"), "not valid JSON"),
    "nested 100,000 deep": (lambda ws: ws.write("calib.json", deeply_nested_json()), "nests JSON too deeply"),
}
for kind, table in (("jsonl", JSONL), ("json", JSON)):
    CASES.update({f"{command}/{kind}/{damage}": Case(lambda ws, c=command, m=make: _conversations(m)(ws)[c], says)
                  for damage, (make, says) in table.items() for command in ("plan", "export")})


def _audio(damage: Callable[[Path], object]) -> Callable[[Workspace], Path]:
    def make(ws: Workspace) -> Path:
        damage(ws.root / "a.wav")
        return ws.jsonl({"audio": "a.wav", "conversations": [{"from": "human", "value": "<audio>\nWhat is it?"}]})
    return make


AUDIO: dict[str, tuple[Callable[[Workspace], Path], str]] = {
    "empty": (_audio(lambda p: p.write_bytes(b"")), "cannot be read"),
    "text named .wav": (_audio(lambda p: p.write_text("not audio")), "cannot be read"),
    "a header alone": (_audio(lambda p: p.write_bytes(wav(p).read_bytes()[:44])), "truncated or empty"),
}
CASES.update({f"plan/audio/{damage}": Case(lambda ws, m=make: _conversations(m, "qwen2_audio")(ws)["plan"], says)
              for damage, (make, says) in AUDIO.items()})
CASES["plan/jsonl/an image for a model without images"] = Case(
    lambda ws: ws.plan_args(ws.model(), ws.write("i.png", (ws.model("llava") / "images/0.png").read_bytes())
                            and ws.jsonl(_record(image="i.png"))), "takes no images")

# --- a program's calibration inputs (.safetensors) --------------------------------------------

PROGRAM_INPUTS: dict[str, tuple[Callable[[Workspace], Path], str]] = {
    "a text file": (lambda ws: ws.write("calib.txt", TEXT), "must be a .safetensors file"),
    "missing": (lambda ws: ws.root / "none.safetensors", "does not exist"),
    "empty": (lambda ws: ws.write("i.safetensors", b""), "is empty"),
    "cut short": (lambda ws: ws.write("i.safetensors", ws.program()[1].read_bytes()[:100]),
                  "not a readable safetensors file"),
    "a model's weights": (lambda ws: ws.write("i.safetensors", (ws.model() / "model.safetensors").read_bytes()),
                          "unexpected tensor"),
}
CASES.update({f"plan/program inputs/{damage}": Case(lambda ws, m=make: ws.plan_args(ws.program()[0], m(ws)), says)
              for damage, (make, says) in PROGRAM_INPUTS.items()})


@pytest.mark.parametrize("case", params(CASES))
def test_damaged_data_is_refused_cleanly(case, ws):
    check(CASES[case], ws)
