"""Every malformed input is refused in one line, never a traceback, with nothing written and
the inputs unchanged: GGUF headers cut short, calibration files and media that lie or are
damaged, and plans that disagree with themselves."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from support.cli import fails_cleanly, invoke
from support.corrupt import decompression_bomb_png, deeply_nested_json, gguf_cut_in_header, wav

# --- GGUF -------------------------------------------------------------------------------

@pytest.mark.parametrize("keep", [6, 40, 100])
def test_a_gguf_cut_inside_its_header(tmp_path, llama, saved_plan, keep):
    gguf = gguf_cut_in_header(tmp_path / "m.gguf", keep)
    for args in (["plan", gguf, "--calib", llama / "calib.jsonl", "--out", tmp_path / "out", "-q"],
                 ["apply", gguf, saved_plan, "--out", tmp_path / "out", "-q"],
                 ["convert", gguf, "--out", tmp_path / "out"]):
        fails_cleanly(args, "is the GGUF file complete?", tmp_path / "out", unchanged=[tmp_path, saved_plan])


def test_a_file_named_gguf_that_is_not_one(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"PK\x03\x04 a zip")
    fails_cleanly(["convert", tmp_path / "m.gguf", "--out", tmp_path / "out"], "is not a GGUF file",
                  tmp_path / "out", unchanged=[tmp_path])


# --- calibration ------------------------------------------------------------------------

def _turns(text: str = "<image>\nWhat colour is the square?") -> list[dict[str, str]]:
    return [{"from": "human", "value": text}, {"from": "gpt", "value": "red"}]


def _jsonl(*records) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


#: name -> (calib.jsonl contents, what the error says)
CALIBRATION = {
    "image is a number": (_jsonl({"image": 5, "conversations": _turns()}), '"image" must be a file path'),
    "null among the images": (_jsonl({"images": ["images/0.png", None], "conversations": _turns()}),
                              '"images" must be a file path'),
    "a turn that is a string": (_jsonl({"conversations": ["hello"]}), "each turn"),
    "a value that is not text": (_jsonl({"conversations": [{"from": "human", "value": ["a"]}]}), "each turn"),
    "invalid UTF-8": ('{"conversations": []}\n'.encode() + b'{"conversations": "\xff\xfe"}\n', "not UTF-8"),
    "JSON nested 100,000 deep": (deeply_nested_json(), "nests JSON too deeply"),
    "a broken line": (_jsonl({"conversations": _turns()}) + "{oops\n", "line 2"),
    "a missing image": (_jsonl({"image": "images/none.png", "conversations": _turns()}), "missing file"),
    "a decompression bomb": (_jsonl({"image": "bomb.png", "conversations": _turns()}), "cannot be read"),
    "an image that is text": (_jsonl({"image": "calib.jsonl", "conversations": _turns()}), "cannot be read"),
}


@pytest.mark.parametrize("case", CALIBRATION)
def test_malformed_calibration(case, tmp_path, llava):
    contents, expected = CALIBRATION[case]
    data = tmp_path / "data"
    shutil.copytree(llava / "images", data / "images")
    decompression_bomb_png(data / "bomb.png")
    calib = data / "calib.jsonl"
    calib.write_bytes(contents if isinstance(contents, bytes) else contents.encode())
    fails_cleanly(["plan", llava, "--calib", calib, "--out", tmp_path / "p", "-q"], expected, tmp_path / "p",
                  unchanged=[tmp_path, llava])


def test_a_calibration_directory_is_called_a_directory(tmp_path, llama):
    fails_cleanly(["plan", llama, "--calib", tmp_path, "--out", tmp_path / "p", "-q"], "is a directory", tmp_path / "p",
                  unchanged=[tmp_path])


@pytest.mark.parametrize("cut, bits, expected", [(1000, 16, "truncated"), (0, 40, "pass 8, 16, 24 or 32-bit")])
def test_damaged_audio(tmp_path, tiny_models, cut, bits, expected):
    model = tiny_models("qwen2_audio")
    if bits == 40:                                 # a header claiming 40-bit samples (5 bytes each)
        path = wav(tmp_path / "a.wav", bits=16)
        raw = bytearray(path.read_bytes())
        raw[32:34] = (5).to_bytes(2, "little")     # block align
        raw[34:36] = (40).to_bytes(2, "little")    # bits per sample
        path.write_bytes(bytes(raw))
    else:
        wav(tmp_path / "a.wav", bits=bits, cut=cut)
    calib = tmp_path / "calib.jsonl"
    calib.write_text(_jsonl({"audio": "a.wav", "conversations": _turns("<audio>\nWhat is this sound?")}))
    fails_cleanly(["plan", model, "--calib", calib, "--out", tmp_path / "p", "-q"], expected, tmp_path / "p",
                  unchanged=[tmp_path, model])


@pytest.mark.parametrize("bits", [8, 16, 24, 32])
def test_pcm_of_every_width_reads_as_the_same_tone(tmp_path, bits):
    from tamp_fx.calibrate.samples import load_audio
    audio = load_audio(wav(tmp_path / "a.wav", bits=bits), 16_000)      # (T,)
    t = np.arange(audio.size) / 16_000
    assert np.abs(audio - 0.5 * np.sin(2 * np.pi * 440 * t)).max() <= 2.0 / 2 ** (bits - 1) + 1e-6  # float32 audio


# --- plans ------------------------------------------------------------------------------

def _edit_json(plan: Path, edit) -> None:
    """Change plan.json in place with ``edit``; a list ``edit`` returns replaces the document."""
    data = json.loads((plan / "plan.json").read_text())
    replaced = edit(data)
    (plan / "plan.json").write_text(json.dumps(replaced if isinstance(replaced, list) else data))


def _edit_tensors(path: Path, edit, metadata=None) -> None:
    with safe_open(path, "pt") as f:
        tensors, kept = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    edit(tensors)
    save_file(tensors, path, metadata=kept if metadata is None else metadata)


def _first(plan: Path) -> str:
    return next(iter(json.loads((plan / "plan.json").read_text())["linears"]))


def _set_linear(key, value, drop=False):
    def edit(data):
        linear = data["linears"][next(iter(data["linears"]))]
        if drop:
            del linear[key]
        else:
            linear[key] = value
    return edit


def _rename_first_linear(plan: Path) -> None:
    """Key the first linear (and its mask) as lm_head.weight, its module name unchanged."""
    first = _first(plan)
    _edit_json(plan, lambda d: d.update(linears={"lm_head.weight" if k == first else k: v for k, v in d["linears"].items()}))
    _edit_tensors(plan / "masks.safetensors", lambda t: t.update({"lm_head.weight": t.pop(first)}), {})


#: name -> (damage done to a copy of the plan directory, what the error says)
PLANS = {
    "mask of the wrong shape": (lambda p: _edit_tensors(p / "masks.safetensors", lambda t: t.update(
        {_first(p): t[_first(p)].reshape(2, -1)})), "does not fit"),
    "mask one byte short": (lambda p: _edit_tensors(p / "masks.safetensors", lambda t: t.update(
        {_first(p): t[_first(p)][:-1].clone()})), "does not fit"),
    "mask stored under another shape": (lambda p: _edit_tensors(p / "masks.safetensors", lambda t: None, {
        "shapes": json.dumps({_first(p): [1, 2]})}), "stores the mask"),
    "masks.safetensors cut short": (lambda p: (p / "masks.safetensors").write_bytes(
        (p / "masks.safetensors").read_bytes()[:200]), "not a readable safetensors file"),
    "masks.safetensors empty": (lambda p: (p / "masks.safetensors").write_bytes(b""), "not a readable safetensors"),
    "a mask the plan does not list": (lambda p: _edit_tensors(p / "masks.safetensors", lambda t: t.update(
        {"extra.weight": torch.zeros(1, dtype=torch.uint8)})), "does not list"),
    "weights of the wrong shape": (lambda p: _edit_tensors(p / "weights.safetensors", lambda t: t.update(
        {_first(p): t[_first(p)].reshape(1, -1).contiguous()})), "weights.safetensors"),
    "weights.safetensors cut short": (lambda p: (p / "weights.safetensors").write_bytes(
        (p / "weights.safetensors").read_bytes()[:100]), "not a readable safetensors file"),
    "no linears": (lambda p: _edit_json(p, lambda d: d.pop("linears")), '"linears" is missing'),
    "no model": (lambda p: _edit_json(p, lambda d: d.pop("model")), '"model" is missing'),
    "a top-level list": (lambda p: _edit_json(p, lambda d: [d]), "holds a list"),
    "an unknown key in a linear": (lambda p: _edit_json(p, _set_linear("colour", "red")), "unknown key 'colour'"),
    "a linear without its shape": (lambda p: _edit_json(p, _set_linear("shape", None, drop=True)), "has no 'shape'"),
    "a shape of three numbers": (lambda p: _edit_json(p, _set_linear("shape", [1, 2, 3])), "not two positive integers"),
    "sparsity above 1": (lambda p: _edit_json(p, _set_linear("sparsity", 1.5)), "outside [0, 1]"),
    "negative target sparsity": (lambda p: _edit_json(p, _set_linear("target_sparsity", -0.1)), "outside [0, 1]"),
    "NaN sparsity": (lambda p: _edit_json(p, _set_linear("sparsity", math.nan)), "outside [0, 1]"),
    "sparsity the mask disagrees with": (lambda p: _edit_json(p, _set_linear("sparsity", 0.2)), "prunes"),
    "a linear outside the decoder": (lambda p: _edit_json(p, _set_linear("module_name", "lm_head.weight")),
                                     "not in the plan's decoder"),
    "a name that is not the linear's": (_rename_first_linear, "does not name the weight"),
    "a config of the wrong types": (lambda p: _edit_json(p, lambda d: d["config"].update(sparsity="half")), "config"),
    "not JSON": (lambda p: (p / "plan.json").write_text("{"), "not valid JSON"),
    "not UTF-8": (lambda p: (p / "plan.json").write_bytes(b"\xff\xfe{}"), "not valid JSON"),
    "JSON nested 100,000 deep": (lambda p: (p / "plan.json").write_text(deeply_nested_json()), "not valid JSON"),
}


@pytest.mark.parametrize("case", PLANS)
def test_damaged_plans_are_refused_by_inspect_and_apply(case, plan_copy, llama, tmp_path):
    damage, expected = PLANS[case]
    damage(plan_copy)
    fails_cleanly(["inspect", plan_copy], expected, unchanged=[tmp_path])
    fails_cleanly(["apply", llama, plan_copy, "--out", tmp_path / "out", "-q"], expected, tmp_path / "out",
                  unchanged=[tmp_path, llama])


# --- statistics that inspect --plot / --html draw ------------------------------------------

def _set_layers(layers):
    return lambda data: data.update(layers=layers)


#: name -> damage to statistics Plan.load does not read (a linear's ``stats``, the ``layers`` records)
STATISTICS = {
    "diversity a string": _set_linear("stats", {"diversity": "garbage"}),
    "importance a list": _set_linear("stats", {"diversity": {"intra": 0.5}, "importance": [1, 2]}),
    "a layer record a string": _set_layers(["not a record"]),
    "a layer record without its layer": _set_layers([{"last_token_attention_per_modality": {"text": 1.0}}]),
    "attention mass a string": _set_layers([{"layer": 0, "last_token_attention_per_modality": {"text": "x"}}]),
    "attention a list": _set_layers([{"layer": 0, "last_token_attention_per_modality": [0.5]}]),
}
#: damage only the report's summary reads (per-layer time and memory)
SUMMARY = {
    "seconds a string": _set_layers([{"layer": 0, "seconds": "slow"}]),
    "peak memory a mapping": _set_layers([{"layer": 0, "peak_host_mib": {"a": 1}}]),
    "resident memory a string": _set_layers([{"layer": 0, "host_mib": "lots"}]),
}
#: damage that is still a plan to draw: NaN and infinity are gaps in a figure, not errors
DRAWABLE = {
    "diversity NaN": _set_linear("stats", {"diversity": {"intra": math.nan}, "importance": math.inf}),
    "attention NaN": _set_layers([{"layer": 0, "last_token_attention_per_modality": {"text": math.nan}}]),
    "seconds NaN": _set_layers([{"layer": 0, "seconds": math.nan, "peak_host_mib": math.inf}]),
}


@pytest.mark.parametrize(("case", "option"), [(c, o) for c in STATISTICS for o in ("--plot", "--html")]
                         + [(c, "--html") for c in SUMMARY])
def test_damaged_statistics_are_one_line_for_plot_and_html(case, option, plan_copy, tmp_path):
    _edit_json(plan_copy, {**STATISTICS, **SUMMARY}[case])
    out = tmp_path / "new" / ("figs" if option == "--plot" else "report.html")
    fails_cleanly(["inspect", plan_copy, option, out, "-q"], "the plan's statistics are damaged", out,
                  unchanged=[tmp_path])


@pytest.mark.parametrize("case", DRAWABLE)
def test_non_finite_statistics_are_drawn_as_gaps(case, plan_copy, tmp_path):
    _edit_json(plan_copy, DRAWABLE[case])
    result = invoke(["inspect", plan_copy, "--plot", tmp_path / "figs", "--html", tmp_path / "r.html", "-q"])
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    assert (tmp_path / "r.html").is_file() and list((tmp_path / "figs").glob("*.png"))
