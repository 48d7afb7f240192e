"""No code runs from model files (issue 5, item 5): pickles are refused, ``.pt2`` archives are
read with ``torch.load(weights_only=True)``, and ``trust_remote_code`` is never turned on."""
from __future__ import annotations

import builtins
import contextlib
import io
import json
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
import transformers

from tamp_fx.errors import TampError
from tamp_fx.load.program import load_program
from tamp_fx.load.source import load_config, load_model, load_processor, resolve_source


@pytest.mark.parametrize("suffix", [".pt", ".bin", ".pth", ".ckpt"])
def test_a_pickle_file_is_refused_with_what_to_use_instead(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    torch.save({"w": torch.zeros(2)}, path)
    with pytest.raises(TampError, match="does not load pickles") as info:
        resolve_source(path)
    assert ".pt2" in str(info.value) and "safetensors" in str(info.value) and "\n" not in str(info.value)


def test_a_directory_with_only_pickled_weights_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    torch.save({"w": torch.zeros(2)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(TampError, match="only pickled weights.*does not load pickles"):
        resolve_source(tmp_path)


@pytest.mark.parametrize("family", ["llama", "llava"])
def test_loading_never_enables_trust_remote_code_and_reads_only_safetensors(family, tiny_models, monkeypatch):
    calls: list[tuple[str, dict]] = []

    def record(owner, attr):
        original = getattr(owner, attr).__func__

        def wrapper(cls, *args, **kwargs):
            calls.append((f"{cls.__name__}.{attr}", kwargs))
            return original(cls, *args, **kwargs)
        monkeypatch.setattr(owner, attr, classmethod(wrapper))

    for owner in (transformers.PreTrainedModel, transformers.AutoConfig, transformers.AutoTokenizer,
                  transformers.AutoProcessor, transformers.AutoImageProcessor, transformers.PretrainedConfig):
        record(owner, "from_pretrained")
    source = resolve_source(tiny_models(family))
    net = load_model(source)
    load_processor(source, net.config)
    assert any(name.endswith("ForCausalLM.from_pretrained") or name.endswith("ForConditionalGeneration.from_pretrained")
               for name, _ in calls), calls
    for name, kwargs in calls:
        assert not kwargs.get("trust_remote_code"), f"{name} was called with trust_remote_code={kwargs['trust_remote_code']}"
        if name.endswith(("ForCausalLM.from_pretrained", "ForConditionalGeneration.from_pretrained")):
            assert kwargs.get("use_safetensors") is True, name


def test_commands_that_need_a_hugging_face_model_refuse_a_pt2(tmp_path):
    path = tmp_path / "m.pt2"
    torch.export.save(torch.export.export(torch.nn.Linear(4, 4), (torch.randn(2, 4),)), path)
    source = resolve_source(path)
    assert source.kind == "pt2"
    with pytest.raises(TampError, match="exported program"):
        load_config(source)


class _Payload:
    """Unpickling this runs code: it writes a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return builtins.exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


def _replace_in_archive(src: Path, dst: Path, suffix: str, data: bytes) -> None:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for item in zin.infolist():
            zout.writestr(item.filename, data if item.filename.endswith(suffix) else zin.read(item.filename))


@pytest.fixture
def program(tmp_path) -> Path:
    path = tmp_path / "clean.pt2"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.export.save(torch.export.export(torch.nn.Linear(4, 4), (torch.randn(2, 4),)), path)
    return path


def test_a_pt2_with_a_code_running_pickle_is_refused_without_running_it(program, tmp_path):
    marker = tmp_path / "marker"
    buffer = io.BytesIO()
    torch.save((_Payload(marker),), buffer)
    evil = tmp_path / "evil.pt2"
    _replace_in_archive(program, evil, "sample_inputs/model.pt", buffer.getvalue())  # the example inputs

    # plain torch.export.load falls back to weights_only=False and runs it (then torch's own log
    # call for that fallback has a format bug, which pytest's log capture turns into a TypeError)
    with warnings.catch_warnings(), contextlib.suppress(TypeError):
        warnings.simplefilter("ignore")
        torch.export.load(evil)
    assert marker.read_text() == "ran", "the crafted archive should run code under plain torch.export.load"
    marker.unlink()

    with pytest.raises(TampError, match="weights_only=True") as info:
        load_program(evil)
    assert not marker.exists(), "tamp-fx ran code from the model file"
    assert "\n" not in str(info.value)


def test_a_pt2_with_a_pickled_object_constant_is_refused(program, tmp_path):
    name = next(n for n in zipfile.ZipFile(program).namelist() if n.endswith("constants_config.json"))
    config = {"config": {"obj": {"path_name": "opaque_obj_0", "is_param": False, "use_pickle": True, "tensor_meta": None}}}
    evil = tmp_path / "evil.pt2"
    _replace_in_archive(program, evil, name, json.dumps(config).encode())
    with pytest.raises(TampError, match="pickled object constant 'obj'"):
        load_program(evil)


def test_a_clean_pt2_loads(program):
    ep = load_program(program)
    assert set(ep.state_dict) == {"weight", "bias"}
