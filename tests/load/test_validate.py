"""A model is checked before any work (tamp_fx.load.validate): a missing, wrong-shaped or
unsupported-dtype tensor is refused from the safetensors headers alone, NaN or inf as the tensor is
read (unless allowed), a damaged ``.pt2`` archive as it is opened, a GGUF whose header sizes
disagree with its tensor table before a model is built; each in one line naming the tensor.
Damaged safetensors headers and ``.pt2`` archives give a correct read or one clean error."""
from __future__ import annotations

import json
import math
import re
import shutil
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from support.corrupt import (
    CHECKPOINT_DAMAGE,
    GGUF_SIZES,
    config_disagrees,
    damage_checkpoint,
    rewrite_checkpoint,
    rewrite_member,
    small_gguf,
)
from support.gguf_reader import as_gguf_reads_it
from tamp_fx.errors import TampError
from tamp_fx.load.checkpoint import checkpoint_index, meta_model, read_header, stored_name
from tamp_fx.load.gguf_header import read_gguf_header
from tamp_fx.load.program import load_program
from tamp_fx.load.source import load_config, load_model, resolve_source
from tamp_fx.load.validate import check_checkpoint, check_program, load_checked
from tamp_fx.testbeds.models import tiny_llama
from tamp_fx.testbeds.tiny import FAMILIES

HEADER_ONLY = [name for name in CHECKPOINT_DAMAGE if "NaN" not in name and "inf" not in name]
VALUES = [name for name in CHECKPOINT_DAMAGE if name not in HEADER_ONLY]


@pytest.fixture
def llava_copy(tiny_models, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_models("llava"), tmp_path / "llava"))


def _refusal(call) -> str:
    with pytest.raises(TampError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message
    return message


@pytest.mark.parametrize("family", FAMILIES)
def test_every_tiny_family_passes_as_saved(family, tiny_models):
    source = resolve_source(tiny_models(family))
    check_checkpoint(source)                                  # no false refusal: tied heads, renamed layouts


@pytest.mark.parametrize("how", HEADER_ONLY)
def test_header_damage_is_refused_without_reading_a_tensor(how, llava_copy, monkeypatch):
    key = damage_checkpoint(llava_copy, how)
    source = resolve_source(llava_copy)
    monkeypatch.setattr("tamp_fx.load.checkpoint.CheckpointIndex.read",
                        lambda *a, **k: pytest.fail("a tensor was read"))
    message = _refusal(lambda: check_checkpoint(source))
    assert CHECKPOINT_DAMAGE[how][1] in message
    assert key.split("model.")[-1].replace("q_prj", "q_proj") in message       # the tensor, by name


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "qwen2_audio", "llama"])
def test_a_missing_tensor_is_named_as_the_checkpoint_would_store_it(family, tiny_models, tmp_path):
    """Each family's checkpoint layout (legacy llava ``language_model.model.``, Qwen2-VL ``model.``)
    differs from the names transformers loads it under: the refusal gives the key to look for."""
    model = Path(shutil.copytree(tiny_models(family), tmp_path / family))
    for how in ("missing decoder weight", "missing embedding"):
        key = damage_checkpoint(model, how)
        message = _refusal(lambda: check_checkpoint(resolve_source(model)))
        assert re.search(rf"has no tensor {re.escape(key)}[ ,]", message), message
        index = checkpoint_index(resolve_source(model), meta_model(resolve_source(model), torch.float32))
        loaded = next(n for n in meta_model(resolve_source(model), torch.float32).state_dict()
                      if n not in index.entries)
        assert (f"(loaded as {loaded})" in message) == (loaded != key)
        shutil.rmtree(model)
        shutil.copytree(tiny_models(family), model)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_missing_key_is_inferred_from_the_others_or_not_guessed(family, tiny_models):
    """Each tensor taken out in turn: the key inferred for it from the rest of the checkpoint is its
    own, or (where the rest does not say) its in-memory name; never another key. Every tensor of a
    layer (decoder, vision or audio tower) is inferred exactly."""
    source = resolve_source(tiny_models(family))
    index = checkpoint_index(source, meta_model(source, torch.float32))
    for name, (key, _) in index.entries.items():
        inferred = stored_name(name, {n: e for n, e in index.entries.items() if n != name})
        assert inferred in (key, name), (name, key, inferred)
        if ".layers." in name:
            assert inferred == key, (name, key, inferred)


def test_a_renamed_tensor_is_named_under_both_names(llava_copy):
    damage_checkpoint(llava_copy, "renamed decoder weight")
    message = _refusal(lambda: check_checkpoint(resolve_source(llava_copy)))
    assert "layers.0.self_attn.q_proj.weight" in message and "layers.0.self_attn.q_prj.weight" in message


def test_a_wrong_shape_names_expected_and_found(llava_copy):
    damage_checkpoint(llava_copy, "decoder weight of the wrong shape")
    message = _refusal(lambda: check_checkpoint(resolve_source(llava_copy)))
    assert "[64, 127]" in message and "[64, 128]" in message


def test_a_config_disagreeing_with_the_weights_is_refused(llava_copy):
    config_disagrees(llava_copy, "hidden_size")
    message = _refusal(lambda: check_checkpoint(resolve_source(llava_copy)))
    assert "config.json" in message and "has shape" in message


@pytest.mark.parametrize("how", VALUES)
def test_nonfinite_values_are_refused_as_they_are_read_unless_allowed(how, llava_copy):
    key = damage_checkpoint(llava_copy, how)
    source = resolve_source(llava_copy)
    check_checkpoint(source)                                  # the headers are fine
    model = meta_model(source, torch.float32)
    index = checkpoint_index(source, model)
    name = next(n for n, (k, _) in index.entries.items() if k == key)
    assert key in _refusal(lambda: index.read([name], torch.float32))
    assert key in _refusal(lambda: load_checked(source))
    assert not torch.isfinite(index.read([name], torch.float32, allow_nonfinite=True)[name]).all()
    load_checked(source, allow_nonfinite=True)


@settings(max_examples=80, deadline=None)
@given(dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64]),
       shape=st.lists(st.integers(1, 70), min_size=1, max_size=3), seed=st.integers(0, 2**31 - 1),
       bad=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.sampled_from([math.nan, math.inf, -math.inf])),
                    max_size=3), scale=st.sampled_from([1.0, 1e30, 6e4]))
def test_the_finite_check_refuses_exactly_what_isfinite_finds(dtype, shape, seed, bad, scale):
    """One reduction (aminmax) instead of a bool copy: any NaN or inf, anywhere, at any magnitude
    of the rest (values at the edge of float16's range included), and nothing else."""
    from tamp_fx.load.checkpoint import check_finite
    tensor = (torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale).to(dtype)
    for where, value in bad:
        tensor.view(-1)[int(where * tensor.numel())] = value
    finite = bool(torch.isfinite(tensor).all())
    if finite:
        check_finite(tensor, "w", "model")
    else:
        assert "NaN or infinite" in _refusal(lambda: check_finite(tensor, "w", "model"))


def test_an_int8_weight_output_of_apply_passes(tiny_models, tmp_path):
    """A torchao-quantized checkpoint is laid out by its quantizer: no false refusal (eval takes it)."""
    pytest.importorskip("torchao")
    import tamp_fx
    model = tiny_models("llama")
    plan = tamp_fx.plan(model, model / "calib.jsonl", tamp_fx.PlanConfig(method="magnitude", nsamples=1, seqlen=16))
    out = tamp_fx.apply(model, plan, tmp_path / "q", quantize="int8-weight")
    load_checked(resolve_source(out))


def test_whole_model_loading_never_initialises_a_missing_tensor(llava_copy):
    """from_pretrained alone fills a missing tensor at random; load_model refuses it too (the GGUF path)."""
    damage_checkpoint(llava_copy, "missing vision weight")
    assert "fc1.weight" in _refusal(lambda: load_model(resolve_source(llava_copy)))


# --- GGUF headers ---------------------------------------------------------------------------

def _no_model_built(monkeypatch) -> None:
    """Building the model or de-quantizing a tensor of the file fails the test."""
    fail = lambda *a, **k: pytest.fail("the model was built or a tensor read")          # noqa: E731
    monkeypatch.setattr("tamp_fx.load.validate.load_model", fail)
    monkeypatch.setattr("gguf.dequantize", fail)


@pytest.mark.parametrize("order", ["LITTLE", "BIG"])
def test_the_gguf_header_reads_as_ggufs_own_reader_reads_it(order, tmp_path):
    import gguf
    path = tmp_path / "m.gguf"
    writer = gguf.GGUFWriter(str(path), "llama", endianess=getattr(gguf.GGUFEndian, order))
    writer.add_uint32("llama.block_count", 2)
    writer.add_uint64("llama.context_length", 2**40)
    writer.add_string("general.name", "modèle")
    for add, value in (("add_int8", -3), ("add_uint16", 7), ("add_int64", -2**40), ("add_float32", 0.1),
                       ("add_float64", 1e-300), ("add_bool", True)):
        getattr(writer, add)(f"x.{add}", value)
    writer.add_token_list(["<s>", "", "ü" * 300])
    writer.add_array("x.nested", [[1, 2], [3]])
    writer.add_array("x.floats", [0.5] * 1000)
    for name, shape in (("blk.0.w", (3, 5)), ("blk.1.w", (2, 3, 4)), ("norm", (7,))):
        writer.add_tensor(name, np.zeros(shape, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert read_gguf_header(path) == as_gguf_reads_it(path)
    assert read_gguf_header(small_gguf(tmp_path / "small.gguf")) == as_gguf_reads_it(tmp_path / "small.gguf")


def test_a_sound_gguf_passes_without_a_tensor_read(tmp_path, monkeypatch):
    """Its tensors all NaN: the check passes (it reads none of them); loading refuses them."""
    path = small_gguf(tmp_path / "m.gguf")
    from gguf import GGUFReader
    start = min(t.data_offset for t in GGUFReader(path).tensors)
    raw = path.read_bytes()
    path.write_bytes(raw[:start] + b"\xff" * (len(raw) - start))                   # 0xffffffff: a NaN float32
    source = resolve_source(path)
    with monkeypatch.context() as patched:
        _no_model_built(patched)
        assert check_checkpoint(source) is None
    assert "NaN" in _refusal(lambda: load_checked(source))
    net = load_checked(source, allow_nonfinite=True)
    assert net.config.hidden_size == GGUF_SIZES["embedding_length"] and len(net.model.layers) == 2


@pytest.mark.parametrize("key, value, says", [
    ("embedding_length", 64, "token_embd.weight of {} has shape [16, 32] where its header gives [16, 64] "
                             "(llama.embedding_length: hidden_size 64)"),
    ("feed_forward_length", 2 ** 40, "blk.0.ffn_gate.weight of {} has shape [48, 32] where its header gives "
                                     f"[{2 ** 40}, 32] (llama.feed_forward_length: intermediate_size {2 ** 40})"),
    ("attention.head_count_kv", 2, "blk.0.attn_k.weight of {} has shape [16, 32] where its header gives [32, 32] "
                                   "(llama.attention.head_count_kv: num_key_value_heads 2, of head_dim 16)"),
    ("vocab_size", 2 ** 40, f"[{2 ** 40}, 32] (llama.vocab_size: vocab_size {2 ** 40})"),
])
def test_a_gguf_sized_upwards_is_refused_before_its_model_is_built(tmp_path, monkeypatch, key, value, says):
    path = small_gguf(tmp_path / "m.gguf", {key: value})
    _no_model_built(monkeypatch)
    message = _refusal(lambda: check_checkpoint(resolve_source(path)))
    assert says.format(path) in message and "re-convert the GGUF file" in message
    assert "re-convert" in _refusal(lambda: load_checked(resolve_source(path)))


@pytest.mark.parametrize("layers", [3, 2 ** 40])
def test_a_gguf_of_more_layers_than_blocks_is_refused_before_its_config_is_built(tmp_path, monkeypatch, layers):
    """(A config can hold a list of one entry per layer: Qwen2's layer_types.)"""
    path = small_gguf(tmp_path / "m.gguf", {"block_count": layers})
    monkeypatch.setattr("transformers.AutoConfig.from_pretrained", lambda *a, **k: pytest.fail("config built"))
    message = _refusal(lambda: load_config(resolve_source(path)))
    assert f"gives {layers} layers (llama.block_count) but holds the tensors of 2" in message


# --- safetensors headers ------------------------------------------------------------------

@pytest.fixture(scope="module")
def shard(tmp_path_factory) -> bytes:
    """A small safetensors file of three tensors (two dtypes), as bytes."""
    from safetensors.torch import save_file
    path = tmp_path_factory.mktemp("st") / "m.safetensors"
    save_file({"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(4, dtype=torch.bfloat16),
               "c": torch.arange(3, dtype=torch.int64)}, path, metadata={"format": "pt"})
    return path.read_bytes()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_damaged_safetensors_header_reads_correctly_or_is_refused_in_one_line(data, shard, tmp_path):
    end = 8 + int.from_bytes(shard[:8], "little")               # the length and the JSON header
    at = data.draw(st.integers(0, end - 1))
    how = data.draw(st.sampled_from(["overwrite", "insert", "delete"]))
    noise = data.draw(st.binary(min_size=1, max_size=8))
    damaged = shard[:at] + (noise if how != "delete" else b"") + shard[at + (len(noise) if how == "overwrite" else
                                                                           1 if how == "delete" else 0):]
    path = tmp_path / "m.safetensors"
    path.write_bytes(damaged)
    try:
        start, header = read_header(path)
    except TampError as error:
        assert "\n" not in str(error) and "m.safetensors" in str(error)
        return
    for key, meta in header.items():                           # accepted: every tensor lies inside the file
        if key != "__metadata__":
            begin, stop = meta["data_offsets"]
            assert start + stop <= len(damaged) and begin <= stop
    try:
        with safe_open(path, "pt") as f:                       # and the library agrees on what it holds
            assert set(f.keys()) == set(header) - {"__metadata__"}
    except Exception:  # noqa: BLE001 - safetensors is stricter (e.g. contiguous offsets): fine
        pass


# --- exported programs --------------------------------------------------------------------

@pytest.fixture(scope="module")
def program(tmp_path_factory) -> Path:
    """A tiny Llama decoder as an exported program."""
    path = tmp_path_factory.mktemp("pt2") / "model.pt2"
    base = tiny_llama(0).model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ep = torch.export.export(base, (), {"input_ids": torch.ones(1, 6, dtype=torch.long), "use_cache": False},
                                 strict=False)
        torch.export.save(ep, path)
    return path


@pytest.fixture(scope="module")
def program_state(program) -> dict[str, torch.Tensor]:
    return dict(load_program(program).state_dict)


@pytest.mark.parametrize("member, change", [
    ("constants_config.json", lambda d: d[: len(d) // 2]),
    ("constants_config.json", lambda d: b"[1, 2]"),
    ("weights_config.json", lambda d: d[: len(d) // 2]),
    ("weight_0", lambda d: d[: len(d) // 2]),
    ("weight_0", lambda d: b""),
])
def test_a_damaged_member_of_a_program_is_refused_in_one_line(program, tmp_path, member, change):
    names = zipfile.ZipFile(program).namelist()
    if not any(n.endswith(member) for n in names):
        pytest.skip(f"this torch writes no {member}")
    damaged = rewrite_member(program, tmp_path / "m.pt2", member, change)
    _refusal(lambda: load_program(damaged))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_flipped_bytes_in_a_program_load_correctly_or_are_refused_in_one_line(data, program, program_state, tmp_path):
    raw = bytearray(program.read_bytes())
    for at in data.draw(st.lists(st.integers(0, len(raw) - 1), min_size=1, max_size=4)):
        raw[at] ^= data.draw(st.integers(1, 255))
    path = tmp_path / "m.pt2"
    path.write_bytes(bytes(raw))
    try:
        ep = load_program(path)
    except TampError as error:
        assert "\n" not in str(error)
        return
    assert ep.state_dict.keys() == program_state.keys()        # a flip the archive tolerates changes no weight
    assert all(torch.equal(ep.state_dict[k], v) for k, v in program_state.items())


def test_nonfinite_weights_of_a_program_are_refused_unless_allowed(program):
    ep = load_program(program)
    name = next(n for n, t in ep.state_dict.items() if t.dim() == 2)
    with torch.no_grad():
        ep.state_dict[name][0, 0] = float("nan")
    assert name in _refusal(lambda: check_program(ep, program))
    check_program(ep, program, allow_nonfinite=True)


def test_the_header_reader_keeps_every_entry(shard, tmp_path):
    path = tmp_path / "m.safetensors"
    path.write_bytes(shard)
    _, header = read_header(path)
    assert json.loads(shard[8:8 + int.from_bytes(shard[:8], "little")]) == header
    rewrite_checkpoint(tmp_path, lambda tensors: None)        # a rewrite that changes nothing reads the same
    assert read_header(path)[1].keys() == header.keys()
