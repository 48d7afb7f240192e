"""Tests for tamp_fx.write.quantize: quantization composes with pruning (issue 5, item 3).

Pruned weights are exactly 0.0; both schemes quantize weights symmetrically (zero point 0),
so those entries must dequantize to exactly 0.0, and the quantized outputs must stay close
(SQNR) to the unquantized pruned model. Skipped without torchao
(``pip install --no-deps torchao==0.18.0``).
"""
from __future__ import annotations

import copy
import doctest
import math
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

pytest.importorskip("torchao")

from tamp_fx.capture.graph import export_layer, linear_nodes, weight_name  # noqa: E402
from tamp_fx.errors import TampError  # noqa: E402
from tamp_fx.prune.masks import apply_mask, keep_mask  # noqa: E402
from tamp_fx.write import quantize  # noqa: E402
from tamp_fx.write.quantize import (  # noqa: E402
    QUANTIZERS,
    dequantized_weight,
    quantize_graph_pt2e,
    quantize_model,
    sqnr_db,
)

# int8 weight-only (per-row symmetric scales, float activations): measured on these random
# pruned stacks, the output SQNR was 40.0 dB at worst over 300 cases (typically 45-48 dB);
# 30 dB leaves a wide margin.
INT8_WEIGHT_MIN_SQNR_DB = 30.0

# pt2e X86InductorQuantizer (static uint8 activations calibrated on one sample, int8
# per-channel weights) on a pruned tiny Llama layer, measured over 6 seeds x 2 layers on the
# calibration sample: layer output (residual included) 53-56 dB; residual branch alone
# (output - hidden_states, what the attention and MLP add) 37-39 dB; 38 dB on a held-out
# sample of the same length. Conservative bounds:
PT2E_OUTPUT_MIN_SQNR_DB = 40.0
PT2E_BRANCH_MIN_SQNR_DB = 25.0


def test_doctests():
    assert doctest.testmod(quantize).failed == 0


def test_sqnr_db():
    x = torch.tensor([3.0, 4.0])
    assert sqnr_db(x, x) == math.inf
    assert sqnr_db(x, torch.zeros(2)) == pytest.approx(0.0)
    assert sqnr_db(x, x * 0.9) == pytest.approx(20.0)


def test_unknown_scheme_is_a_one_line_error():
    with pytest.raises(TampError, match="unknown quantization scheme 'int3': choose one of int8-weight, pt2e-x86"):
        quantize_model(nn.Linear(16, 16), "int3")
    with pytest.raises(TampError, match="quantize_graph_pt2e"):
        quantize_model(nn.Linear(16, 16), "pt2e-x86")
    assert QUANTIZERS.names() == ("int8-weight", "pt2e-x86")


def test_missing_torchao_is_a_one_line_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao", None)  # makes `import torchao` raise ImportError
    for call in (lambda: quantize_model(nn.Linear(16, 16), "int8-weight"),
                 lambda: quantize_graph_pt2e(nn.Linear(16, 16), (torch.randn(2, 16),))):
        with pytest.raises(TampError, match=r"pip install --no-deps torchao==0\.18\.0") as info:
            call()
        assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------- int8-weight


def prune_(linear: nn.Linear, sparsity: float, gen: torch.Generator) -> torch.Tensor:
    """Prune ``linear`` in place with a row-wise keep-mask of random scores; return the mask."""
    mask = keep_mask(torch.rand(linear.weight.shape, generator=gen), sparsity, "row")
    with torch.no_grad():
        linear.weight.copy_(apply_mask(linear.weight, mask))
    return mask


@settings(max_examples=40, deadline=None)
@given(dims=st.lists(st.sampled_from([16, 32, 48, 64]), min_size=3, max_size=3),
       bias=st.booleans(), sparsity=st.floats(0.3, 0.7), batch=st.integers(1, 8),
       seed=st.integers(0, 2**31 - 1))
def test_int8_weight_keeps_pruned_zeros_and_sqnr(dims, bias, sparsity, batch, seed):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    pruned = nn.Sequential(nn.Linear(dims[0], dims[1], bias=bias), nn.Linear(dims[1], dims[2])).eval()
    masks = [prune_(layer, sparsity, gen) for layer in pruned]
    x = torch.randn(batch, dims[0], generator=gen)  # (B, C_in)

    quantized = quantize_model(copy.deepcopy(pruned), "int8-weight")
    with torch.no_grad():
        ref, out = pruned(x), quantized(x)  # (B, C_out) each
    for mask, layer in zip(masks, quantized):
        assert type(layer.weight).__name__ == "Int8Tensor"
        weight = dequantized_weight(layer)
        assert weight.shape == mask.shape and weight.dtype == torch.float32
        assert bool((weight[~mask] == 0).all()), "a pruned weight became nonzero after quantization"
    assert sqnr_db(ref, out) >= INT8_WEIGHT_MIN_SQNR_DB


def test_int8_weight_only_quantizes_selected_linears():
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 16)).eval()
    original = copy.deepcopy(model)
    seen = []

    def only_first(name, module):
        seen.append(name)
        return name == "0"

    assert quantize_model(model, "int8-weight", modules=only_first) is model
    assert seen == ["0", "2"]  # only nn.Linear modules are offered to the selector
    assert type(model[0].weight).__name__ == "Int8Tensor"
    assert type(model[2].weight) is nn.Parameter and torch.equal(model[2].weight, original[2].weight)
    assert torch.equal(dequantized_weight(model[2]), original[2].weight)


# ----------------------------------------------------------------------------- pt2e-x86


@pytest.fixture(scope="module")
def pruned_llama_layer():
    """A real Llama decoder layer (tiny, random), its call inputs for two samples of 8 tokens
    and one of 12, and a pruned copy (60% per row, random scores) with its keep-masks."""
    from tamp_fx.load.adapters import decoder_layout
    from tamp_fx.testbeds.models import random_activations, tiny_llama
    model = tiny_llama(0)
    acts = random_activations(model, [8, 8, 12], seed=0)
    pruned = copy.deepcopy(decoder_layout(model).layers[0]).eval()
    gen = torch.Generator().manual_seed(0)
    masks = {f"{name}.weight": prune_(module, 0.6, gen)
             for name, module in pruned.named_modules() if isinstance(module, nn.Linear)}
    calls = [((acts.hidden[i],), acts.layer_kwargs[i][0]) for i in range(3)]
    return pruned, masks, calls


def linear_weight_names(layer, args, kwargs):
    """Weight names of the layer's aten.linear nodes, in graph order (a static export, as
    quantize_graph_pt2e does; converting only inserts nodes, so the order is kept)."""
    with torch.no_grad():
        gm = torch.export.export(copy.deepcopy(layer), args, kwargs, strict=False).module()
    return [weight_name(node) for node in linear_nodes(gm)]


def check_pruned_zeros(converted, names, masks):
    linears = linear_nodes(converted)
    assert len(linears) == len(names) == 7
    for name, node in zip(names, linears):
        dq = node.args[1]  # the weight input: dequantize_per_channel(int8 constant, scales, zero points)
        assert dq.target == torch.ops.quantized_decomposed.dequantize_per_channel.default
        assert quantize._evaluate_constant(dq.args[0]).dtype == torch.int8
        assert bool((quantize._evaluate_constant(dq.args[2]) == 0).all())  # symmetric: zero point 0
        weight = dequantized_weight(node)
        mask = masks[name]
        assert weight.shape == mask.shape
        assert bool((weight[~mask] == 0).all()), f"{name}: a pruned weight became nonzero after quantization"


def test_pt2e_quantized_decoder_layer(pruned_llama_layer):
    pruned, masks, calls = pruned_llama_layer
    before = {k: v.clone() for k, v in pruned.state_dict().items()}
    (args, kwargs), (held_args, held_kwargs) = calls[0], calls[1]

    converted = quantize_graph_pt2e(pruned, args, kwargs)

    assert isinstance(converted, torch.fx.GraphModule)
    assert all(torch.equal(before[k], v) for k, v in pruned.state_dict().items())  # input left alone
    check_pruned_zeros(converted, linear_weight_names(pruned, args, kwargs), masks)
    for a, kw in ((args, kwargs), (held_args, held_kwargs)):  # calibration sample, then a held-out one
        with torch.no_grad():
            ref, out = pruned(*a, **kw), converted(*a, **kw)  # (1, N, C) each
        hidden = a[0]
        assert out.shape == ref.shape and bool(torch.isfinite(out).all())
        assert sqnr_db(ref, out) >= PT2E_OUTPUT_MIN_SQNR_DB
        assert sqnr_db(ref - hidden, out - hidden) >= PT2E_BRANCH_MIN_SQNR_DB


def test_pt2e_accepts_a_dynamic_export_layer_graph(pruned_llama_layer):
    pruned, masks, calls = pruned_llama_layer
    (args, kwargs), (long_args, long_kwargs) = calls[0], calls[2]
    gm = export_layer(copy.deepcopy(pruned), args, kwargs)  # sequence length dynamic
    names = [weight_name(node) for node in linear_nodes(gm)]

    converted = quantize_graph_pt2e(gm, args, kwargs)

    check_pruned_zeros(converted, names, masks)
    with torch.no_grad():
        ref, out = pruned(*long_args, **long_kwargs), converted(*long_args, **long_kwargs)  # 12 tokens
    assert out.shape == ref.shape == (1, 12, 32)
    # Calibrated on 8 tokens only, measured 41.8 dB (residual branch 28.7 dB) on 12 tokens.
    assert sqnr_db(ref, out) >= 30.0
