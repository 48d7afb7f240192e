"""Semi-structured (2:4) weights (issue 5, item 2).

On CPU: the 2:4 check, the reference packing (round trip), the kernels' shape limits, the
one-line error without a CUDA GPU, and `tamp-fx apply --format semi-structured` end to end on
tiny models (a bfloat16 checkpoint that `from_pretrained` loads, with a manifest of its 2:4
linears). On a CUDA GPU of compute capability 8.0+ only: the sparse tensors and the rewrite pass
give the dense results.
"""
from __future__ import annotations

import dataclasses
import doctest
import json

import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import tamp_fx
from tamp_fx.artifact.plan import Plan
from tamp_fx.capture.graph import linear_nodes, weight_name
from tamp_fx.cli.main import app
from tamp_fx.passes.base import DECISION_KEY
from tamp_fx.passes.plan import LinearDecision
from tamp_fx.passes.rewrite import RewriteConfig, rewrite
from tamp_fx.prune import semi_structured
from tamp_fx.prune.masks import apply_mask, nm_keep_mask
from tamp_fx.prune.semi_structured import check_shape, compress_2_4, decompress_2_4, is_2_4
from tamp_fx.testbeds.models import checkpoint_tensors

runner = CliRunner()
NO_SPARSE_GPU = semi_structured.cuda_problem()
_skip_without_sparse_gpu = pytest.mark.skipif(NO_SPARSE_GPU is not None, reason=f"2:4 kernels need CUDA sm80+: {NO_SPARSE_GPU}")


def needs_sparse_gpu(test):
    """Skipped without a CUDA GPU that runs the 2:4 kernels; marked ``cuda`` (bench/gpu_check.sh runs ``-m cuda``)."""
    return pytest.mark.cuda(_skip_without_sparse_gpu(test))


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def masked_2_4(c_out: int, c_in: int, seed: int, dtype: torch.dtype = torch.float32, extra_zeros: float = 0.0):
    """A random weight (C_out, C_in) pruned 2:4 by magnitude, with about ``extra_zeros`` of the kept entries zero too."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(c_out, c_in, generator=g)                                  # (C_out, C_in)
    keep = nm_keep_mask(weight.abs(), 2, 4) & (torch.rand(c_out, c_in, generator=g) >= extra_zeros)
    return apply_mask(weight, keep).to(dtype)


def test_doctests():
    assert doctest.testmod(semi_structured).failed == 0


@settings(max_examples=200, deadline=None)
@given(c_out=st.integers(1, 9), groups=st.integers(1, 9), seed=st.integers(0, 2**16),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), extra_zeros=st.sampled_from([0.0, 0.3, 1.0]))
def test_decompress_inverts_compress_on_2_4_weights(c_out, groups, seed, dtype, extra_zeros):
    w = masked_2_4(c_out, 4 * groups, seed, dtype, extra_zeros)
    values, positions = compress_2_4(w)
    assert values.shape == (c_out, 2 * groups) and values.dtype == dtype
    assert positions.shape == (c_out, groups, 2) and positions.dtype == torch.uint8
    assert bool((positions[..., 0] < positions[..., 1]).all()) and int(positions.max()) <= 3
    assert torch.equal(decompress_2_4(values, positions), w)
    # every nonzero entry is among the kept values
    assert int((values != 0).sum()) == int((w != 0).sum())


def test_compress_pads_a_group_with_its_lowest_zero_positions():
    w = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 3.0, 0.0, 1.0, 0.0, 0.0, 2.0]])
    values, positions = compress_2_4(w)
    assert positions.tolist() == [[[0, 1], [0, 2], [0, 3]]]
    assert values.tolist() == [[0.0, 0.0, 0.0, 3.0, 1.0, 2.0]]


@pytest.mark.parametrize("n, expected", [(2, True), (3, True), (1, False), (0, False)])
def test_is_2_4_on_n_of_4_masks_and_their_weights(n, expected):
    scores = torch.randn(8, 32, generator=torch.Generator().manual_seed(n))
    mask = nm_keep_mask(scores, n, 4)                                   # n zeros in every 4 columns
    assert is_2_4(mask) is expected
    assert is_2_4(apply_mask(scores, mask)) is expected


def test_is_2_4_edge_cases():
    assert is_2_4(torch.zeros(3, 8))                                     # all pruned: at most 2 kept
    assert not is_2_4(torch.zeros(3, 6))                                 # C_in not a multiple of 4
    assert not is_2_4(torch.zeros(8))                                    # not 2-D
    assert not is_2_4(torch.tensor([[1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0]]))   # the second group keeps 3


@pytest.mark.parametrize("weight, message", [
    (torch.ones(2, 8), "not 2:4"),
    (torch.zeros(2, 6), "C_in a multiple of 4"),
    (torch.zeros(8), "2-D"),
])
def test_compress_refuses_bad_weights(weight, message):
    with pytest.raises(ValueError, match=message):
        compress_2_4(weight)


def test_decompress_refuses_bad_shapes():
    with pytest.raises(ValueError, match="do not match"):
        decompress_2_4(torch.zeros(2, 4), torch.zeros(2, 3, 2, dtype=torch.uint8))
    with pytest.raises(ValueError, match="0..3"):
        decompress_2_4(torch.zeros(1, 2), torch.tensor([[[0, 4]]], dtype=torch.uint8))


@pytest.mark.parametrize("shape, dtype, backend, message", [
    ((4096, 11008), torch.bfloat16, None, None),
    ((32, 64), torch.float16, None, None),
    ((16, 16), torch.bfloat16, "cusparselt", None),
    ((16, 64), torch.bfloat16, None, "C_out a multiple of 32 (cutlass)"),
    ((48, 64), torch.float16, "cutlass", "C_out a multiple of 32 (cutlass)"),
    ((64, 96), torch.bfloat16, None, "C_in a multiple of 64 (cutlass)"),
    ((8, 16), torch.bfloat16, "cusparselt", "C_out a multiple of 16 (cusparselt)"),
    ((16, 24), torch.float16, "cusparselt", "C_in a multiple of 16 (cusparselt)"),
    ((64, 64), torch.float32, None, "float16 or bfloat16"),
    ((64, 64), torch.bfloat16, "triton", "unknown 2:4 backend"),
    ((64, 64, 1), torch.bfloat16, None, "2-D"),
])
def test_check_shape_names_the_limit_that_fails(shape, dtype, backend, message):
    if message is None:
        check_shape(shape, dtype, backend)
    else:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            check_shape(shape, dtype, backend)


def test_shape_limits_match_torch():
    classes = {"cusparselt": torch.sparse.SparseSemiStructuredTensorCUSPARSELT,
               "cutlass": torch.sparse.SparseSemiStructuredTensorCUTLASS}
    for backend, limits in semi_structured.MIN_SHAPE.items():
        constraints = getattr(classes[backend], "_DTYPE_SHAPE_CONSTRAINTS", None)
        if constraints is None:
            pytest.skip("this torch keeps its 2:4 shape limits elsewhere")
        for dtype, (rows, cols) in limits.items():
            assert (constraints[dtype].sparse_min_rows, constraints[dtype].sparse_min_cols) == (rows, cols), (backend, dtype)


def test_the_manifest_round_trips_and_bad_ones_are_refused_in_one_line(tmp_path):
    semi_structured.write_manifest(tmp_path, ["b.q_proj", "a.up_proj"], torch.bfloat16)
    assert semi_structured.read_manifest(tmp_path) == ["a.up_proj", "b.q_proj"]
    for text, message in (("{", "not valid JSON"), ('{"format_version": 2, "modules": []}', "format_version 2"),
                          ('{"format_version": 1}', "lists no module names"), ("[]", "format_version None")):
        (tmp_path / semi_structured.MANIFEST).write_text(text)
        with pytest.raises(tamp_fx.TampError, match=message) as info:
            semi_structured.read_manifest(tmp_path)
        assert "\n" not in str(info.value)
    with pytest.raises(tamp_fx.TampError, match="has no semi_structured.json"):
        semi_structured.read_manifest(tmp_path / "elsewhere")


def tiny_mlp_graph(dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """An exported two-linear MLP (64 -> 128 -> 64) with 2:4 decisions on both linears: (gm, masked weights)."""
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64)).to(device, dtype)
    gm = torch.export.export(mlp, (torch.randn(3, 64, device=device, dtype=dtype),)).module()
    masked = {}
    for node in linear_nodes(gm):
        name = weight_name(node)
        weight = gm.get_parameter(name).detach()
        mask = nm_keep_mask(weight.abs().float(), 2, 4)
        node.meta[DECISION_KEY] = LinearDecision(weight=name, target_sparsity=0.5, sparsity=0.5, group="2:4",
                                                 mask=mask, pattern="2:4")
        masked[name] = apply_mask(weight, mask)
    return gm, mlp, masked


def assert_one_line_cuda_error(error: BaseException) -> None:
    message = str(error)
    assert isinstance(error, tamp_fx.TampError) and "\n" not in message, message
    assert "compute capability 8.0+" in message and "--format dense" in message and NO_SPARSE_GPU in message


@pytest.mark.skipif(NO_SPARSE_GPU is None, reason="this machine runs the 2:4 kernels")
def test_without_a_sparse_gpu_every_cuda_step_says_so_in_one_line(tmp_path):
    gm, _, _ = tiny_mlp_graph()
    for call in (semi_structured.require_cuda,
                 lambda: semi_structured.to_semi_structured(masked_2_4(32, 64, 0)),
                 lambda: semi_structured.sparsify(torch.nn.Linear(64, 32), [""]),
                 lambda: semi_structured.load(tmp_path),
                 lambda: rewrite(gm, RewriteConfig(semi_structured=True))):
        with pytest.raises(tamp_fx.TampError) as info:
            call()
        assert_one_line_cuda_error(info.value)


@needs_sparse_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_to_semi_structured_holds_the_masked_weight(dtype):
    w = masked_2_4(128, 256, 1, dtype)
    sparse = semi_structured.to_semi_structured(w)
    assert isinstance(sparse, torch.sparse.SparseSemiStructuredTensor) and sparse.dtype == dtype
    assert torch.equal(sparse.to_dense().cpu(), w)


@needs_sparse_gpu
def test_a_linear_with_a_semi_structured_weight_matches_dense():
    linear = torch.nn.Linear(256, 128).to("cuda", torch.float16)
    with torch.no_grad():
        linear.weight.copy_(masked_2_4(128, 256, 2, torch.float16))
    x = torch.randn(2, 40, 256, device="cuda", dtype=torch.float16)          # (batch, tokens, C_in)
    dense = linear(x)
    semi_structured.sparsify(linear, [""])
    assert isinstance(linear.weight.data, torch.sparse.SparseSemiStructuredTensor)
    torch.testing.assert_close(linear(x), dense, rtol=1e-2, atol=1e-2)


@needs_sparse_gpu
def test_the_rewrite_pass_emits_semi_structured_weights_that_match_dense():
    gm, _, masked = tiny_mlp_graph(torch.float16, "cuda")
    x = torch.randn(3, 64, device="cuda", dtype=torch.float16)      # the batch the graph was exported with
    linear = torch.nn.functional.linear
    hidden = torch.relu(linear(x, masked["0.weight"], gm.get_parameter("0.bias")))             # (3, 128)
    expected = linear(hidden, masked["2.weight"], gm.get_parameter("2.bias"))                   # (3, 64)
    assert rewrite(gm, RewriteConfig(semi_structured=True)).modified
    for name in masked:
        assert isinstance(gm.get_parameter(name).data, torch.sparse.SparseSemiStructuredTensor)
    torch.testing.assert_close(gm(x), expected, rtol=1e-2, atol=1e-2)


# --- apply --format semi-structured, end to end on tiny models (CPU) -------------------------

@pytest.fixture(scope="module")
def plans(tiny_models, tmp_path_factory):
    """family -> (model dir, 2:4 magnitude plan dir), planned once."""
    cache = {}

    def get(family: str):
        if family not in cache:
            model, plan_dir = tiny_models(family), tmp_path_factory.mktemp(f"plan-{family}") / "plan"
            r = invoke("plan", model, "--calib", model / "calib.jsonl", "--method", "magnitude", "--pattern", "2:4",
                       "--nsamples", "2", "--out", plan_dir, "--quiet")
            assert r.exit_code == 0, r.output
            cache[family] = model, plan_dir
        return cache[family]
    return get


def fails_in_one_line(result, expected: str) -> None:
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and expected in result.output, result.output


@pytest.mark.parametrize("family", ["llama", "llava"])
def test_apply_semi_structured_writes_a_bf16_2_4_checkpoint_that_from_pretrained_loads(family, plans, tmp_path):
    model, plan_dir = plans(family)
    out = tmp_path / "semi"
    r = invoke("apply", model, plan_dir, "--out", out, "--format", "semi-structured", "--quiet")
    assert r.exit_code == 0, r.output
    assert "2:4 semi-structured" in r.output
    if NO_SPARSE_GPU:
        assert "run only on a CUDA GPU (sm80+) via tamp_fx.prune.semi_structured.load" in r.output
    plan = Plan.load(plan_dir)
    manifest = json.loads((out / semi_structured.MANIFEST).read_text())
    assert manifest["format_version"] == 1 and manifest["dtype"] == "bfloat16"
    assert manifest["modules"] == sorted(lp.module_name.removesuffix(".weight") for lp in plan.linears.values())
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"

    original, written = checkpoint_tensors(model), checkpoint_tensors(out)
    assert written.keys() == original.keys()
    for name, tensor in written.items():
        expected = apply_mask(original[name], plan.masks[name]) if name in plan.masks else original[name]
        assert torch.equal(tensor, expected.to(torch.bfloat16) if expected.is_floating_point() else expected), name

    config = transformers.AutoConfig.from_pretrained(out)
    net = getattr(transformers, config.architectures[0]).from_pretrained(out, dtype="auto").eval()
    assert {p.dtype for p in net.parameters()} == {torch.bfloat16}
    for module in manifest["modules"]:
        linear = net.get_submodule(module)
        zeros = (linear.weight == 0).reshape(linear.out_features, -1, 4).sum(-1)      # (C_out, C_in / 4)
        assert isinstance(linear, torch.nn.Linear) and bool((zeros == 2).all()), module
    with torch.no_grad():
        net(input_ids=torch.tensor([[1, 2, 3, 4]]))


def test_a_plan_with_linears_left_dense_lists_only_its_2_4_linears(plans, tmp_path):
    model, plan_dir = plans("llama")
    plan = Plan.load(plan_dir)
    dense_name = next(iter(plan.linears))
    linears = {**plan.linears, dense_name: dataclasses.replace(plan.linears[dense_name], pattern="dense", sparsity=0.0,
                                                               target_sparsity=0.0)}
    masks = {**plan.masks, dense_name: torch.ones_like(plan.masks[dense_name])}
    tamp_fx.apply(model, dataclasses.replace(plan, linears=linears, masks=masks), tmp_path / "out",
                  format="semi-structured")
    modules = json.loads((tmp_path / "out" / semi_structured.MANIFEST).read_text())["modules"]
    assert modules == sorted(lp.module_name.removesuffix(".weight") for n, lp in plan.linears.items() if n != dense_name)


def test_an_unstructured_plan_is_refused_in_one_line(tiny_models, tmp_path):
    model = tiny_models("llama")
    r = invoke("plan", model, "--calib", model / "calib.jsonl", "--method", "magnitude", "--sparsity", "0.5",
               "--nsamples", "2", "--out", tmp_path / "plan", "--quiet")
    assert r.exit_code == 0, r.output
    fails_in_one_line(invoke("apply", model, tmp_path / "plan", "--out", tmp_path / "out", "--format", "semi-structured"),
                      "plan with `--pattern 2:4`")
    assert not (tmp_path / "out").exists()


def test_quantize_with_semi_structured_is_refused_in_one_line(plans, tmp_path):
    model, plan_dir = plans("llama")
    fails_in_one_line(invoke("apply", model, plan_dir, "--out", tmp_path / "out", "--format", "semi-structured",
                             "--quantize", "int8-weight"), "cannot be combined")
    assert not (tmp_path / "out").exists()


def test_an_exported_program_is_refused_in_one_line(plans, tmp_path):
    _, plan_dir = plans("llama")
    program = tmp_path / "model.pt2"
    program.write_bytes(b"")                      # refused before it is read
    fails_in_one_line(invoke("apply", program, plan_dir, "--out", tmp_path / "out.pt2", "--format", "semi-structured"),
                      "does not take an exported program (.pt2) yet")
