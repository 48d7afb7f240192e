"""safetensors files a tensor at a time: the bytes save_file writes, each tensor made when its turn
comes and let go before the next, and tensors read from an open file only when asked for."""
from __future__ import annotations

import weakref

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from tamp_fx.runtime.tensor_file import DTYPES, StoredTensor, save_tensors


def _tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g).to(dtype)
    if dtype.is_complex:
        return torch.randn(shape, generator=g, dtype=dtype)
    return torch.randint(0, 2, shape, generator=g).to(dtype)


@settings(max_examples=30, deadline=None)
@given(entries=st.lists(st.tuples(st.sampled_from(sorted(DTYPES)), st.lists(st.integers(0, 5), max_size=3)),
                        min_size=0, max_size=8),
       names=st.lists(st.text("ab.é_1", min_size=1, max_size=6), min_size=8, max_size=8, unique=True),
       metadata=st.sampled_from([None, {}, {"format": "pt"}]))
def test_the_bytes_are_save_files(entries, names, metadata, tmp_path_factory):
    tensors = {names[i]: _tensor(DTYPES[d], tuple(shape), i) for i, (d, shape) in enumerate(entries)}
    if not tensors and metadata == {}:
        metadata = None                  # save_file then writes '{},"__metadata__":{}}', not JSON (0.8.0)
    out = tmp_path_factory.mktemp("t")
    save_file(tensors, out / "reference.safetensors", metadata=metadata)
    save_tensors(out / "streamed.safetensors", {k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()},
                 tensors.__getitem__, metadata)
    assert (out / "streamed.safetensors").read_bytes() == (out / "reference.safetensors").read_bytes()
    stored = StoredTensor.open_all(out / "streamed.safetensors")
    assert stored.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert (stored[name].dtype, stored[name].shape) == (tensor.dtype, tuple(tensor.shape))
        assert torch.equal(stored[name].read(), tensor)


def test_each_tensor_is_made_when_its_turn_comes_and_let_go_before_the_next(tmp_path):
    made: list[weakref.ref] = []

    def produce(name: str) -> torch.Tensor:
        assert all(ref() is None for ref in made), "an earlier tensor is still held"
        tensor = torch.full((64, 64), float(len(made)))
        made.append(weakref.ref(tensor))
        return tensor

    save_tensors(tmp_path / "t.safetensors", {f"w{i}": (torch.float32, (64, 64)) for i in range(4)}, produce)
    assert len(made) == 4
    stored = StoredTensor.open_all(tmp_path / "t.safetensors")
    assert [float(stored[f"w{i}"].read()[0, 0]) for i in range(4)] == [0.0, 1.0, 2.0, 3.0]


def test_a_tensor_that_does_not_match_its_layout_is_refused(tmp_path):
    with pytest.raises(ValueError, match="laid out as torch.float32 \\(2,\\) but produced as torch.bfloat16"):
        save_tensors(tmp_path / "t.safetensors", {"w": (torch.float32, (2,))},
                     lambda name: torch.zeros(2, dtype=torch.bfloat16))


def test_an_open_file_reads_what_it_held_when_opened_after_its_path_is_replaced(tmp_path):
    path = tmp_path / "t.safetensors"
    save_file({"w": torch.ones(3)}, path)
    stored = StoredTensor.open_all(path)
    replacement = tmp_path / "new.safetensors"
    save_file({"w": torch.zeros(3)}, replacement)
    replacement.replace(path)
    assert stored["w"].read().tolist() == [1.0, 1.0, 1.0]
