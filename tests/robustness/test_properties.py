"""Generated damage: whatever happens to plan.json, masks.safetensors or the calibration
records, tamp-fx either works or raises a TampError (one line at the command line), never
another exception."""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tamp_fx
from support.cli import invoke
from support.corrupt import damaged, damaged_bytes, json_values
from tamp_fx.artifact.plan import Plan
from tamp_fx.calibrate.samples import calibration_inputs, load_calibration
from tamp_fx.errors import TampError
from tamp_fx.load.source import load_processor, resolve_source

_SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _load_or_refuse(directory: Path, llama: Path) -> None:
    """Plan.load refuses with a TampError, or the plan it returns inspects and applies (or is
    refused by apply with a TampError)."""
    try:
        plan = Plan.load(directory)
    except TampError:
        return
    result = invoke(["inspect", directory])
    assert result.exit_code == 0 or (result.exit_code == 1 and result.output.startswith("error:")), result.output
    try:
        tamp_fx.apply(llama, plan, directory.parent / "out")
    except TampError:
        pass


@_SETTINGS
@given(data=st.data())
def test_damaged_plan_json(saved_plan, llama, data):
    document = json.loads((saved_plan / "plan.json").read_text())
    with tempfile.TemporaryDirectory() as root:
        plan = Path(shutil.copytree(saved_plan, Path(root) / "plan"))
        (plan / "plan.json").write_text(json.dumps(data.draw(damaged(document))))
        _load_or_refuse(plan, llama)


@_SETTINGS
@pytest.mark.parametrize("name", ["masks.safetensors", "weights.safetensors"])
@given(data=st.data())
def test_damaged_safetensors(saved_plan, llama, name, data):
    with tempfile.TemporaryDirectory() as root:
        plan = Path(shutil.copytree(saved_plan, Path(root) / "plan"))
        (plan / name).write_bytes(data.draw(damaged_bytes((saved_plan / name).read_bytes())))
        _load_or_refuse(plan, llama)


@pytest.fixture(scope="module")
def llava_processor(llava):
    return load_processor(resolve_source(llava))


def _records(llava: Path):
    valid = json.loads((llava / "calib.jsonl").read_text().splitlines()[0])
    valid["image"] = str(llava / valid["image"])
    return st.lists(st.one_of(damaged(valid), json_values, st.just(valid)), min_size=1, max_size=3)


@_SETTINGS
@given(data=st.data())
def test_damaged_calibration_records(llava, llava_processor, data):
    records = data.draw(_records(llava))
    raw = data.draw(st.sampled_from(["jsonl", "json", "bytes"]))
    with tempfile.TemporaryDirectory() as root:
        path = Path(root) / f"calib.{'json' if raw == 'json' else 'jsonl'}"
        if raw == "bytes":
            path.write_bytes(data.draw(damaged_bytes("".join(json.dumps(r) + "\n" for r in records).encode())))
        else:
            path.write_text(json.dumps(records) if raw == "json" else "".join(json.dumps(r) + "\n" for r in records))
        for step in (lambda: calibration_inputs(path), lambda: load_calibration(path, llava_processor, nsamples=3)):
            try:
                step()
            except TampError:
                pass


@given(st.text())
def test_a_wrapped_error_gives_one_nonempty_line_whatever_its_message(message):
    """Every TampError that wraps another error quotes ``first_line`` of it: one non-empty
    line, even for an empty or whitespace-only message (``splitlines()[0]`` raised there)."""
    from tamp_fx.errors import first_line

    line = first_line(ValueError(message))
    assert line and line == line.strip() and len(line.splitlines()) == 1
    assert line in message or line == "ValueError"
