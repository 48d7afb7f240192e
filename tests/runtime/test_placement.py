"""Where a plan is computed does not change it: layer-by-layer loading, device, dtype and
activation offload are run options (tamp_fx.runtime.placement, tamp_fx.capture.layers)."""
from __future__ import annotations

import contextlib
import json
import weakref

import pytest
import torch
from typer.testing import CliRunner

import tamp_fx
from tamp_fx.capture.layers import CheckpointLayers
from tamp_fx.cli.main import app
from tamp_fx.load.source import load_model, resolve_source
from tamp_fx.pipeline.plan import open_layer_by_layer
from tamp_fx.testbeds.tiny import FAMILIES, slow_except

runner = CliRunner()


def fails_cleanly(args, expected: str, *must_not_exist) -> None:
    """One line starting with "error:", a non-zero exit, nothing written (as in test_bad_input)."""
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code != 0, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and expected in result.output, result.output
    for path in must_not_exist:
        assert not path.exists() and not list(path.parent.glob(f".{path.name}.tmp-*")), f"{path} was written"


def plan_args(model, calib, out, *extra):
    return ["plan", model, "--calib", calib, "--out", out, "--quiet", *extra]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _plan(model, method="tamp", tokens=None, **placement):
    config = tamp_fx.PlanConfig(method=method, tokens=tokens, sparsity=0.5, nsamples=3)
    return tamp_fx.plan(model, model / "calib.jsonl", config, **placement)


def assert_same_masks(a: tamp_fx.Plan, b: tamp_fx.Plan) -> None:
    assert a.masks.keys() == b.masks.keys()
    for name in a.masks:
        assert torch.equal(a.masks[name], b.masks[name]), name
    assert a.weights.keys() == b.weights.keys()
    for name in a.weights:
        assert torch.equal(a.weights[name], b.weights[name]), name
    assert a.model["fingerprint"] == b.model["fingerprint"]


@pytest.mark.parametrize("family", slow_except(FAMILIES, "llava_next", "qwen2_vl"))
def test_layer_by_layer_loading_plans_exactly_what_the_whole_model_does(family, tiny_models):
    model = tiny_models(family)
    assert_same_masks(_plan(model, device="cpu", layer_by_layer=True), _plan(model, device="cpu", layer_by_layer=False))


@pytest.mark.parametrize("method, tokens", [("wanda", "atv"), ("sparsegpt", "balanced")])
def test_atv_and_balanced_plan_the_same_whole_layer_by_layer_and_offloaded(method, tokens, tiny_models):
    model = tiny_models("llava_next")
    base = _plan(model, method, tokens, device="cpu", layer_by_layer=True)
    assert_same_masks(base, _plan(model, method, tokens, device="cpu", layer_by_layer=False))
    assert_same_masks(base, _plan(model, method, tokens, device="cpu", offload_activations=True))


def test_sparsegpt_weights_are_the_same_layer_by_layer(tiny_models):
    model = tiny_models("llava_next")
    assert_same_masks(_plan(model, "sparsegpt", device="cpu", layer_by_layer=True),
                      _plan(model, "sparsegpt", device="cpu", layer_by_layer=False))


@pytest.mark.parametrize("family", FAMILIES)
def test_the_capture_parts_read_from_the_checkpoint_equal_from_pretrained(family, tiny_models):
    source = resolve_source(tiny_models(family))
    whole = load_model(source)
    expected = {**dict(whole.named_parameters()), **dict(whole.named_buffers())}
    net, layout, _ = open_layer_by_layer(source, torch.device("cpu"), None)
    real = {n: t for n, t in [*net.named_parameters(), *net.named_buffers()] if not t.is_meta}
    assert not any(n.startswith(layout.prefix + ".") for n in real)          # no decoder layer is read yet
    for name, tensor in real.items():
        assert tensor.dtype == expected[name].dtype and torch.equal(tensor, expected[name]), name
    materialised_modules = {n.rpartition(".")[0] for n in real}
    for name, tensor in expected.items():                                    # everything the capture runs is there
        if name.rpartition(".")[0] in materialised_modules:
            assert name in real, name


def test_only_one_decoder_layer_is_in_memory_at_a_time(tiny_models, monkeypatch):
    opened, previous = [], []
    original = CheckpointLayers.open

    @contextlib.contextmanager
    def open_(self, index):
        real = [n for n, t in [*self.model.named_parameters(), *self.model.named_buffers()] if not t.is_meta]
        alive = sum(r() is not None for r in previous)                       # the last layer's tensors, freed?
        opened.append((index, real, alive))
        with original(self, index) as layer:
            previous[:] = [weakref.ref(t) for t in layer.parameters()]
            yield layer
    monkeypatch.setattr(CheckpointLayers, "open", open_)
    _plan(tiny_models("llava"), device="cpu")
    assert [i for i, _, _ in opened] == [0, 1, 0, 1]                         # DAS profile, then prune
    assert all(real == [] for _, real, _ in opened)                          # capture parts released, layers closed
    assert all(alive == 0 for _, _, alive in opened)                         # nothing (graphs, templates) keeps them


def test_the_plan_does_not_record_where_it_was_computed(tiny_models, tmp_path):
    model = tiny_models("llama")
    plan32 = _plan(model, "wanda", device="cpu", dtype="float32")
    plan16 = _plan(model, "wanda", device="cpu", dtype="bfloat16")
    assert plan16.config == plan32.config and plan16.model == plan32.model
    for name, mask in plan16.masks.items():                                  # exactly half of every row, in bf16 too
        assert torch.all(mask.sum(1) == mask.shape[1] // 2), name


def test_offloaded_activations_plan_the_same(tiny_models):
    model = tiny_models("qwen2_vl")
    assert_same_masks(_plan(model, device="cpu", offload_activations=True), _plan(model, device="cpu"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_cuda_is_one_line_and_writes_nothing(tiny_models, tmp_path):
    llama = tiny_models("llama")
    fails_cleanly(plan_args(llama, llama / "calib.jsonl", tmp_path / "p", "--device", "cuda"),
                  "CUDA is not available", tmp_path / "p")
    fails_cleanly(["eval", llama, "--text", llama / "calib.jsonl", "--device", "cuda"], "CUDA is not available")


def test_unknown_dtype_and_device_are_one_line_and_write_nothing(tiny_models, tmp_path):
    llama = tiny_models("llama")
    fails_cleanly(plan_args(llama, llama / "calib.jsonl", tmp_path / "p", "--dtype", "nonsense"),
                  "unknown dtype 'nonsense'", tmp_path / "p")
    fails_cleanly(plan_args(llama, llama / "calib.jsonl", tmp_path / "p", "--device", "tpu:7"),
                  "use cpu, cuda or cuda:N", tmp_path / "p")
    fails_cleanly(["eval", llama, "--text", llama / "calib.jsonl", "--dtype", "float8"], "unknown dtype 'float8'")


def test_the_cli_plans_layer_by_layer_and_whole_alike(tiny_models, tmp_path):
    llava = tiny_models("llava")
    for flag in ("--layer-by-layer", "--whole-model"):
        r = runner.invoke(app, [str(a) for a in plan_args(llava, llava / "calib.jsonl", tmp_path / flag, "--method", "wanda",
                                                          "--nsamples", "2", "--device", "cpu", "--dtype", "float32", flag)])
        assert r.exit_code == 0, r.output
    a, b = (json.loads((tmp_path / f / "plan.json").read_text()) for f in ("--layer-by-layer", "--whole-model"))
    assert a["linears"] == b["linears"] and a["model"] == b["model"]
    assert_same_masks(*(tamp_fx.Plan.load(tmp_path / f) for f in ("--layer-by-layer", "--whole-model")))


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("family", ["llava_next", "qwen2_vl"])
def test_cuda_plans_match_exact_sparsity_and_offload_changes_nothing(family, tiny_models):
    model = tiny_models(family)
    on_gpu = _plan(model, device="cuda", dtype="float32")
    assert_same_masks(on_gpu, _plan(model, device="cuda", dtype="float32", offload_activations=True))
    on_cpu = _plan(model, device="cpu")
    assert on_gpu.linears.keys() == on_cpu.linears.keys()
    assert on_gpu.model == on_cpu.model                                        # fingerprint included
    # other kernels round differently, so near-ties may go either way, but the budget is the same
    assert on_gpu.summary()["sparsity"] == pytest.approx(on_cpu.summary()["sparsity"], abs=2e-3)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("method, tokens", [("wanda", "atv"), ("wanda", "balanced"), ("sparsegpt", "atv")])
def test_cuda_atv_and_balanced_plan_what_the_cpu_does(method, tokens, tiny_models):
    """The same tokens chosen (ATV's share per modality) and the masks to near-ties of the rounding."""
    model = tiny_models("llava_next")
    on_gpu, on_cpu = _plan(model, method, tokens, device="cuda", dtype="float32"), _plan(model, method, tokens, device="cpu")
    for name, lp in on_cpu.linears.items():
        assert on_gpu.linears[name].stats["selected_fraction"] == pytest.approx(lp.stats["selected_fraction"], abs=1e-6)
        assert (on_gpu.masks[name] == on_cpu.masks[name]).float().mean() >= 0.99, name


@pytest.mark.cuda
@needs_cuda
def test_cuda_bfloat16_plan_prunes_every_row_by_half(tiny_models):
    plan = _plan(tiny_models("llava"), "wanda", device="cuda", dtype="bfloat16")
    for name, mask in plan.masks.items():
        assert mask.device.type == "cpu" and torch.all(mask.sum(1) == mask.shape[1] // 2), name


@pytest.mark.parametrize("stored", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("target", [torch.float32, torch.bfloat16])
def test_chunked_checkpoint_reads_equal_the_stored_tensors_and_their_fingerprints(stored, target, tmp_path, monkeypatch):
    from safetensors.torch import save_file

    from tamp_fx.load import checkpoint, fingerprint
    tensors = {"w": torch.randn(37, 53).to(stored), "b": torch.randn(11).to(stored), "i": torch.arange(5)}
    save_file(tensors, tmp_path / "m.safetensors")
    monkeypatch.setattr(checkpoint, "READ_CHUNK_BYTES", 100)                   # many chunks, ragged last one
    index = checkpoint.CheckpointIndex({n: (n, tmp_path / "m.safetensors") for n in tensors})
    samples = {}
    read = index.read(list(tensors), target, samples)
    for name, tensor in tensors.items():
        expected = tensor.to(target) if tensor.is_floating_point() else tensor
        assert read[name].dtype == expected.dtype and torch.equal(read[name], expected), name
    assert samples == {"w": fingerprint.fingerprint_sample(tensors["w"])}         # of the stored values


def test_a_tensor_past_two_to_the_24_values_is_fingerprinted_as_the_checkpoint_reader_records_it(tmp_path):
    """float32 rounds the last sampled position of 2**24 + 4 values past the end: a writer's
    fingerprint_sample raised IndexError there (apply on Llama-3-8B shapes' 4096 x 14336 weights)."""
    from safetensors.torch import save_file

    from tamp_fx.load import checkpoint, fingerprint
    w = torch.arange(2 * (2**23 + 2), dtype=torch.float32).to(torch.bfloat16).view(2, -1)   # 2**24 + 4 values
    save_file({"w": w}, tmp_path / "m.safetensors")
    samples = {}
    checkpoint.CheckpointIndex({"w": ("w", tmp_path / "m.safetensors")}).read(["w"], torch.bfloat16, samples)
    assert samples == {"w": fingerprint.fingerprint_sample(w)}
    assert len(samples["w"][1]) == 4 * 4095


def test_a_checkpoint_missing_a_decoder_tensor_is_one_line(tiny_models, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file
    model = shutil.copytree(tiny_models("llama"), tmp_path / "m")
    tensors = load_file(model / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    fails_cleanly(plan_args(model, model / "calib.jsonl", tmp_path / "p", "--device", "cpu"),
                  "has no tensor model.layers.1.mlp.up_proj.weight", tmp_path / "p")


def test_tied_embeddings_are_read_for_the_capture(tiny_models, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file
    model = shutil.copytree(tiny_models("llama"), tmp_path / "tied")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    tensors = load_file(model / "model.safetensors")
    del tensors["lm_head.weight"]                                            # as save_pretrained writes a tied model
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    assert_same_masks(_plan(model, "wanda", device="cpu", layer_by_layer=True),
                      _plan(model, "wanda", device="cpu", layer_by_layer=False))


@pytest.mark.parametrize("native", [True, False])
def test_half_precision_on_a_cpu_without_native_products_warns_and_training_stays_float32(native, monkeypatch, caplog):
    from tamp_fx.runtime import placement

    monkeypatch.setattr(placement, "cpu_multiplies_natively", lambda dtype: native or dtype == torch.float32)
    cpu = torch.device("cpu")
    with caplog.at_level("WARNING", logger="tamp_fx.runtime.placement"):
        assert placement.resolve_dtype("bfloat16", cpu, torch.float32) == torch.bfloat16
        assert placement.resolve_dtype("auto", cpu, torch.float16) == torch.float16
        assert placement.resolve_dtype(None, cpu, torch.bfloat16) == torch.float32   # the CPU default: no warning
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == (0 if native else 2) and all("--dtype float32" in m for m in warned), warned
    a, b = torch.randn(4, 8), torch.randn(8, 3)
    with placement.cpu_autocast():
        product = a @ b
    assert product.dtype == (torch.bfloat16 if native else torch.float32)


@pytest.mark.parametrize("native", [True, False])
def test_plans_default_to_bfloat16_where_the_device_computes_it_natively(native, monkeypatch):
    from tamp_fx.errors import TampError
    from tamp_fx.runtime import placement

    cpu = torch.device("cpu")
    monkeypatch.setattr(placement, "computes_bf16_natively", lambda device: native)
    monkeypatch.delenv(placement.DTYPE_VARIABLE, raising=False)
    assert placement.resolve_dtype(None, cpu, torch.float32, native_default=True) == (torch.bfloat16 if native else torch.float32)
    assert placement.resolve_dtype(None, cpu, torch.float32) == torch.float32          # eval's default
    assert placement.resolve_dtype("float32", cpu, torch.float32, native_default=True) == torch.float32   # --dtype wins
    monkeypatch.setenv(placement.DTYPE_VARIABLE, "float32")
    assert placement.resolve_dtype(None, cpu, torch.float32, native_default=True) == torch.float32
    monkeypatch.setenv(placement.DTYPE_VARIABLE, "fp8")
    with pytest.raises(TampError, match="TAMP_FX_DTYPE='fp8' is not a dtype"):
        placement.resolve_dtype(None, cpu, torch.float32, native_default=True)


def test_a_plan_records_the_dtype_it_ran_in(tiny_models, monkeypatch):
    from tamp_fx.runtime import placement
    monkeypatch.delenv(placement.DTYPE_VARIABLE)
    monkeypatch.setattr(placement, "computes_bf16_natively", lambda device: True)
    plan = _plan(tiny_models("llama"), "wanda", device="cpu")
    assert (plan.timing["device"], plan.timing["dtype"]) == ("cpu", "bfloat16")
