"""Generated damage to what the readers of tamp-fx take that the other fuzz tests leave out
(calibration bytes: tests/calibrate/test_samples.py; plan.json, whole safetensors files and
calibration records: test_properties.py): the media a conversation names, the tensors and
metadata inside a plan's masks file, GGUF headers (their sizes damaged upwards too), and
`eval --text` and `diff` through the command line.
Any damage gives a correct result or one TampError (one ``error:`` line at the command line)."""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

import tamp_fx
from support.cli import invoke
from support.corrupt import GGUF_SIZES, damaged, damaged_bytes, gguf_size_changed, json_values, small_gguf, wav
from support.memory import memory_cap
from support.snapshot import error_lines
from tamp_fx.artifact.plan import Plan
from tamp_fx.calibrate.samples import load_calibration
from tamp_fx.errors import TampError
from tamp_fx.load.source import load_config, load_model, load_processor, resolve_source
from tamp_fx.load.validate import load_checked

_SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _correct_or_one_error(step):
    """``step()``'s result, or None where it raised a TampError of one line; any other exception fails."""
    try:
        return step()
    except TampError as error:
        assert len(str(error).splitlines()) == 1, str(error)
        return None


@pytest.fixture(scope="module")
def processors(tiny_models):
    """family -> processor of the tiny llava (images) and qwen2_audio (audio)."""
    return {family: load_processor(resolve_source(tiny_models(family))) for family in ("llava", "qwen2_audio")}


#: a media key, the family whose processor takes it, the placeholder of its turn
_MEDIA = {"image": ("llava", "<image>"), "images": ("llava", "<image>"), "audio": ("qwen2_audio", "<audio>"),
          "video": ("llava", "<video>")}


@_SETTINGS
@given(data=st.data(), key=st.sampled_from(sorted(_MEDIA)))
def test_damaged_media_give_samples_or_one_error(tiny_models, processors, data, key):
    """A conversation whose media key holds a path to damaged bytes of a real PNG or WAV, any JSON
    value, or a list mixing both."""
    family, placeholder = _MEDIA[key]
    png = (tiny_models("llava") / "images" / "0.png").read_bytes()
    with tempfile.TemporaryDirectory() as root:
        folder = Path(root)
        real = wav(folder / "real.wav").read_bytes() if family == "qwen2_audio" else png
        (folder / "m.bin").write_bytes(data.draw(st.one_of(st.just(real), damaged_bytes(real)), label="media"))
        value = data.draw(st.one_of(st.just("m.bin"), json_values, st.lists(st.sampled_from(["m.bin", 3, ""]),
                                                                                max_size=3)), label=key)
        (folder / "c.jsonl").write_text(json.dumps({key: value, "conversations": [
            {"from": "human", "value": f"{placeholder}\nWhat is it?"}, {"from": "gpt", "value": "red"}]}) + "\n")
        found = _correct_or_one_error(lambda: load_calibration(folder / "c.jsonl", processors[family], nsamples=1))
        assert found is None or (len(found) == 1 and found[0]["input_ids"].dim() == 2)


@st.composite
def tensors(draw) -> torch.Tensor:
    """A small tensor of a mask's dtype or another, of any rank and size."""
    dtype = draw(st.sampled_from([torch.uint8, torch.bool, torch.float32, torch.int64]))
    shape = draw(st.lists(st.integers(0, 40), max_size=3))
    values = torch.randint(0, 3, shape, generator=torch.Generator().manual_seed(draw(st.integers(0, 99))))
    return values.to(dtype)


def _apply_or_refuse(plan_dir: Path, llama: Path) -> None:
    plan = _correct_or_one_error(lambda: Plan.load(plan_dir))
    if plan is not None:
        _correct_or_one_error(lambda: tamp_fx.apply(llama, plan, plan_dir.parent / "out"))


@_SETTINGS
@given(data=st.data())
def test_damaged_tensors_and_metadata_in_the_masks_file(saved_plan, llama, data):
    """masks.safetensors rewritten whole (so its header is valid) with one mask of another
    dtype, shape or values, a mask removed or added, or its metadata damaged."""
    with safe_open(saved_plan / "masks.safetensors", "pt") as f:
        masks, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    name = data.draw(st.sampled_from(sorted(masks)), label="mask")
    how = data.draw(st.sampled_from(["tensor", "remove", "add", "metadata"]), label="how")
    if how == "tensor":
        masks[name] = data.draw(tensors(), label="tensor")
    elif how == "remove":
        del masks[name]
    elif how == "add":
        masks[data.draw(st.text(min_size=1, max_size=12), label="name")] = torch.zeros(4, dtype=torch.uint8)
    else:
        key = data.draw(st.sampled_from(sorted(metadata) or ["shapes"]), label="key")
        document = json.loads(metadata[key]) if key in metadata else {}
        metadata[key] = json.dumps(data.draw(damaged(document), label="metadata"))
    with tempfile.TemporaryDirectory() as root:
        plan = Path(shutil.copytree(saved_plan, Path(root) / "plan"))
        save_file(masks, plan / "masks.safetensors", metadata=metadata)
        _apply_or_refuse(plan, llama)


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory) -> bytes:
    """A small complete GGUF file (a tiny llama with its tokenizer), as bytes."""
    return small_gguf(tmp_path_factory.mktemp("gguf") / "m.gguf").read_bytes()


@pytest.fixture(scope="module")
def gguf_header_end(gguf_file, tmp_path_factory) -> int:
    """Where :func:`gguf_file`'s header ends (its first tensor begins)."""
    from gguf import GGUFReader
    path = tmp_path_factory.mktemp("gguf") / "m.gguf"
    path.write_bytes(gguf_file)
    return min(t.data_offset for t in GGUFReader(path).tensors)


def damaged_header(data, gguf_file: bytes, end: int) -> bytes:
    """``gguf_file`` damaged inside its header, before ``end`` (magic, version, counts, metadata,
    tensor infos)."""
    header = data.draw(st.integers(8, end), label="header end")
    return data.draw(damaged_bytes(gguf_file[:header]), label="header") + gguf_file[header:]


@_SETTINGS
@given(data=st.data())
def test_damaged_gguf_headers(gguf_file, gguf_header_end, data):
    """The GGUF reader behind the config and tokenizer (sizes damaged upwards: the next test)."""
    with tempfile.TemporaryDirectory() as root:
        path = Path(root) / "m.gguf"
        path.write_bytes(damaged_header(data, gguf_file, gguf_header_end))
        source = _correct_or_one_error(lambda: resolve_source(path))
        if source is not None and _correct_or_one_error(lambda: load_config(source)) is not None:
            _correct_or_one_error(lambda: load_processor(source))


def _load_at_the_files_sizes(source, dtype=torch.float32):
    """``load_model``, only for a GGUF whose config has the sizes of its tensors (a context length
    aside): a model of any other size fails the test instead of being built."""
    config = load_config(source)
    sizes = {"block_count": config.num_hidden_layers, "embedding_length": config.hidden_size,
             "feed_forward_length": config.intermediate_size, "attention.head_count": config.num_attention_heads,
             "attention.head_count_kv": config.num_key_value_heads, "rope.dimension_count": config.head_dim,
             "vocab_size": config.vocab_size}
    assert sizes == {k: v for k, v in GGUF_SIZES.items() if k != "context_length"}, f"a model of {sizes} would be built"
    return load_model(source, dtype)


@_SETTINGS
@given(data=st.data())
def test_gguf_sizes_damaged_upwards_are_refused_before_the_model_is_built(gguf_file, data):
    """A size of the GGUF header raised in place (up to 2**32 - 1): refused in one line before a
    model is built (under a memory cap, and a model of other sizes fails the test), unless it is
    the context length, which sizes no tensor."""
    key = data.draw(st.sampled_from(sorted(GGUF_SIZES)), label="size")
    value = data.draw(st.integers(GGUF_SIZES[key] + 1, 2 ** 32 - 1), label="value")
    with tempfile.TemporaryDirectory() as root, memory_cap(), \
            mock.patch("tamp_fx.load.validate.load_model", _load_at_the_files_sizes):
        path = Path(root) / "m.gguf"
        path.write_bytes(gguf_file)
        gguf_size_changed(path, key, value)
        net = _correct_or_one_error(lambda: load_checked(resolve_source(path)))
        assert (net is not None) == (key == "context_length")


def _one_line_or_success(result) -> None:
    assert "Traceback" not in result.output
    if result.exit_code != 0:
        lines = error_lines(result.output)
        assert result.exit_code in (1, 2) and len(lines) == 1 and lines[0].startswith("error:"), result.output


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.one_of(st.binary(max_size=400), st.text(min_size=1, max_size=400).map(str.encode)))
def test_eval_text_through_the_command_line(llama, text):
    """`eval --text` on any bytes: perplexity, or one error line before the model is loaded."""
    with tempfile.TemporaryDirectory() as root:
        path = Path(root) / "t.txt"
        path.write_bytes(text)
        _one_line_or_success(invoke(["eval", llama, "--text", path, "--no-vqa", "--seqlen", 4, "--max-windows", 2,
                                     "-q"]))


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_diff_a_damaged_plan_json_through_the_command_line(saved_plan, data):
    """`diff` of a plan and a copy whose plan.json is damaged: the table, or one error line."""
    document = json.loads((saved_plan / "plan.json").read_text())
    with tempfile.TemporaryDirectory() as root:
        plan = Path(shutil.copytree(saved_plan, Path(root) / "plan"))
        (plan / "plan.json").write_text(json.dumps(data.draw(damaged(document), label="plan.json")))
        _one_line_or_success(invoke(["diff", saved_plan, plan]))
