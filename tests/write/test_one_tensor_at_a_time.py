"""Writers hold one weight at a time: a SparseGPT plan saved, read back and applied never unpacks,
reads or prunes a weight before the last one was let go, so a plan or model of 8B parameters
needs memory for its largest weight, not for all of them."""
from __future__ import annotations

import tempfile
import weakref

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import tamp_fx
from tamp_fx.artifact.plan import Plan
from tamp_fx.load.checkpoint import read_header, stored_fingerprint
from tamp_fx.load.fingerprint import fingerprint_sample
from tamp_fx.load.source import load_model, resolve_source
from tamp_fx.prune.masks import KeptValues, PackedMask
from tamp_fx.runtime.tensor_file import StoredTensor
from tamp_fx.write import apply as apply_module


@pytest.fixture(scope="module")
def llava(tiny_models):
    return tiny_models("llava")


@pytest.fixture(scope="module")
def plan(llava):
    plan = tamp_fx.plan(llava, llava / "calib.jsonl", tamp_fx.PlanConfig(method="sparsegpt", sparsity=0.5, nsamples=4))
    assert len(plan.weights) == len(plan.linears) > 1
    return plan


def _one_at_a_time(monkeypatch, owner, name: str) -> list[weakref.ref]:
    """Patch ``owner.name`` (a method returning a tensor) to fail if a tensor it returned earlier is still alive."""
    made, real = [], getattr(owner, name)

    def once_the_last_is_gone(*args, **kwargs):
        assert all(ref() is None for ref in made), f"{owner.__name__}.{name}: an earlier tensor is still held"
        tensor = real(*args, **kwargs)
        made.append(weakref.ref(tensor))
        return tensor

    monkeypatch.setattr(owner, name, once_the_last_is_gone)
    return made


def test_a_plan_is_saved_one_weight_at_a_time_and_read_back_only_when_asked(plan, tmp_path, monkeypatch):
    unpacked = _one_at_a_time(monkeypatch, KeptValues, "unpack")
    plan.save(tmp_path / "plan")
    assert len(unpacked) == len(plan.weights)
    monkeypatch.undo()

    read = _one_at_a_time(monkeypatch, StoredTensor, "read")
    loaded = Plan.load(tmp_path / "plan")
    assert not read, "loading a plan read its weights"
    assert {n: loaded.weights.layout(n) for n in loaded.weights} == {n: plan.weights.layout(n) for n in plan.weights}
    loaded.save(tmp_path / "again")
    assert len(read) == len(plan.weights)
    assert (tmp_path / "again" / "weights.safetensors").read_bytes() == (tmp_path / "plan" / "weights.safetensors").read_bytes()
    monkeypatch.undo()
    assert all(torch.equal(loaded.weights[n], plan.weights[n]) for n in plan.weights)


def test_apply_reads_and_prunes_one_tensor_at_a_time(llava, plan, tmp_path, monkeypatch):
    plan.save(tmp_path / "plan")
    loaded = Plan.load(tmp_path / "plan")
    pruned = _one_at_a_time(monkeypatch, Plan, "pruned")
    out = tamp_fx.apply(llava, loaded, tmp_path / "out")
    assert len(pruned) > len(plan.linears)                     # every tensor of the checkpoint went through
    monkeypatch.undo()
    written = dict(load_model(resolve_source(out)).named_parameters())
    reference = dict(load_model(resolve_source(tamp_fx.apply(llava, plan, tmp_path / "reference"))).named_parameters())
    assert all(torch.equal(written[n], reference[n]) for n in reference)


@pytest.mark.parametrize("saved", [True, False], ids=["plan-read-back", "plan-in-memory"])
def test_apply_reads_each_tensor_of_the_checkpoint_once(llava, plan, tmp_path, monkeypatch, saved):
    """The plan is checked against sampled values (a few thousand small reads per linear), so a
    checkpoint of 15 GB is read once, to be written, not twice; each mask is unpacked once, also
    where the plan holds SparseGPT's kept values (scattered by the same unpacked mask)."""
    if saved:
        plan.save(tmp_path / "plan")
    loaded = Plan.load(tmp_path / "plan") if saved else plan
    reads, unpacked = [], []
    real, unpack = apply_module._read, PackedMask.unpack
    monkeypatch.setattr(apply_module, "_read", lambda f, key, *a: reads.append(key) or real(f, key, *a))
    monkeypatch.setattr(PackedMask, "unpack", lambda self: unpacked.append(self) or unpack(self))
    tamp_fx.apply(llava, loaded, tmp_path / "out")
    keys = []
    for shard in sorted(llava.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            keys += list(f.keys())
    assert sorted(reads) == sorted(keys) and set(plan.linears) <= set(reads)
    assert len(unpacked) == len(plan.linears), "each mask unpacked once (`name in masks` unpacked it too)"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (64, 128), (300, 77), (2, 40000)])
def test_the_sampled_fingerprint_is_the_whole_tensors(dtype, shape, tmp_path):
    tensors = {"a": torch.randn(7, dtype=dtype), "w": torch.randn(shape, dtype=torch.float64).to(dtype),
               "z": torch.randn(3, 3, dtype=dtype)}
    save_file(tensors, tmp_path / "m.safetensors")
    header = read_header(tmp_path / "m.safetensors")
    for key in tensors:
        assert stored_fingerprint(tmp_path / "m.safetensors", key, header) == fingerprint_sample(tensors[key])


def _plan_sparsegpt(llava):
    return tamp_fx.plan(llava, llava / "calib.jsonl", tamp_fx.PlanConfig(method="sparsegpt", sparsity=0.5, nsamples=4))


def test_reconstructed_weights_wait_in_temporary_files_that_nothing_outlives(llava, plan, tmp_path, monkeypatch):
    """While a plan runs, each finished layer's reconstructed weights leave memory for a temporary
    file in TMPDIR, unlinked as soon as it is open: a SparseGPT plan of an 8B model would otherwise
    hold ~7 GB of them; they read back bit for bit, and TMPDIR is left as it was."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    spilled = _plan_sparsegpt(llava)
    assert not list(tmp.iterdir())
    for name in plan.weights:
        kept, mask = spilled.weights.held(name)
        assert isinstance(kept.values, StoredTensor), name
        assert torch.equal(spilled.weights[name], plan.weights[name]), name


def test_where_the_temporary_directory_is_full_they_stay_in_memory_with_one_warning(llava, plan, monkeypatch, caplog):
    from tamp_fx.pipeline import sequential
    from tamp_fx.runtime import tensor_file

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tensor_file, "save_tensors", disk_full)
    monkeypatch.setattr(sequential, "_SPILL_FAILED", [])
    with caplog.at_level("WARNING"):
        kept_in_memory = _plan_sparsegpt(llava)
    warnings = [r.getMessage() for r in caplog.records if "temporary directory" in r.getMessage()]
    assert len(warnings) == 1 and "No space left on device" in warnings[0] and "TMPDIR" in warnings[0]
    for name in plan.weights:
        kept, mask = kept_in_memory.weights.held(name)
        assert isinstance(kept.values, torch.Tensor), name
        assert torch.equal(kept_in_memory.weights[name], plan.weights[name]), name
