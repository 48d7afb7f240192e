"""The pass contract on real (tiny, random) Llama decoder layers."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tamp_fx.capture.graph import analyse_linears, export_layer, linear_nodes, weight_name
from tamp_fx.passes.base import DECISION_KEY, OBSERVER_PREFIX
from tamp_fx.passes.instrument import InstrumentConfig, instrument
from tamp_fx.passes.plan import PlanPassConfig, plan
from tamp_fx.passes.rewrite import rewrite
from tamp_fx.prune.masks import pruned_count
from tamp_fx.statistics.observers import ObserverContext
from tamp_fx.testbeds.models import random_activations, tiny_llama

SLOW = settings(max_examples=8, deadline=None)


def _layer_and_acts(seed: int, seq_lens: list[int], kv_heads: int = 2):
    model = tiny_llama(seed, kv_heads=kv_heads)
    acts = random_activations(model, seq_lens, seed)
    return model.model.layers[0], acts


def _linear_inputs(layer, acts) -> dict[str, list[torch.Tensor]]:
    """Every linear's inputs (T, C_in) per sample, recorded with hooks on the eager layer."""
    seen: dict[str, list[torch.Tensor]] = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out, name=name: seen.setdefault(name, []).append(inp[0].reshape(-1, inp[0].shape[-1])))
             for name, m in layer.named_modules() if isinstance(m, torch.nn.Linear)]
    _run(layer, acts)
    for h in hooks:
        h.remove()
    return seen


def _run(module, acts, context=None):
    outs = []
    with torch.no_grad():
        for j in range(len(acts)):
            if context is not None:
                context.labels = acts.labels[j]
            outs.append(module(acts.hidden[j], **acts.layer_kwargs[j][0]))
    return outs


@SLOW
@given(seed=st.integers(0, 2**16), seq_lens=st.lists(st.integers(2, 24), min_size=1, max_size=3),
       kv_heads=st.sampled_from([1, 2, 4]))
def test_observers_leave_every_output_bit_identical(seed, seq_lens, kv_heads):
    layer, acts = _layer_and_acts(seed, seq_lens, kv_heads)
    gm = export_layer(layer, (acts.hidden[0],), acts.layer_kwargs[0][0])
    before = _run(gm, acts)
    context = ObserverContext()
    result = instrument(gm, InstrumentConfig(context))
    assert result.modified and len(result.info["linear"]) == 7 and len(result.info["attention"]) == 1
    after = _run(gm, acts, context)
    for a, b in zip(before, after):
        assert torch.equal(a, b)
    assert all(o.stats.n_tokens == sum(seq_lens) for o in result.info["linear"].values())


@SLOW
@given(seed=st.integers(0, 2**16), seq_lens=st.lists(st.integers(2, 16), min_size=1, max_size=3))
def test_a_keep_all_plan_is_the_identity(seed, seq_lens):
    layer, acts = _layer_and_acts(seed, seq_lens)
    gm = export_layer(layer, (acts.hidden[0],), acts.layer_kwargs[0][0])
    before = _run(gm, acts)
    context = ObserverContext()
    observers = instrument(gm, InstrumentConfig(context)).info["linear"]
    _run(gm, acts, context)
    weights = {n: gm.get_parameter(n).detach().clone() for n in observers}
    decisions = plan(gm, PlanPassConfig("wanda", {n: 0.0 for n in observers}, observers)).info["decisions"]
    assert all(d.mask.all() and d.sparsity == 0.0 for d in decisions.values())
    rewrite(gm)
    assert not any(str(n.target).startswith(OBSERVER_PREFIX) for n in gm.graph.nodes)
    for n, w in weights.items():
        assert torch.equal(gm.get_parameter(n), w)
    for a, b in zip(before, _run(gm, acts)):
        assert torch.equal(a, b)


def test_wanda_plan_equals_a_brute_force_reference_and_leaves_the_model_untouched():
    layer, acts = _layer_and_acts(3, [7, 12, 5])
    original = {n: p.detach().clone() for n, p in layer.named_parameters()}
    seen = _linear_inputs(layer, acts)                                     # brute force: the eager layer's

    gm = export_layer(layer, (acts.hidden[0],), acts.layer_kwargs[0][0])
    context = ObserverContext()
    observers = instrument(gm, InstrumentConfig(context)).info["linear"]
    _run(gm, acts, context)
    decisions = plan(gm, PlanPassConfig("wanda", {n: 0.5 for n in observers}, observers)).info["decisions"]
    assert all(DECISION_KEY in n.meta for n in linear_nodes(gm))
    for module_name, inputs in seen.items():
        x = torch.cat(inputs).double()                                   # (T, C_in)
        w = original[f"{module_name}.weight"].double()
        expected = torch.ones_like(w, dtype=torch.bool)
        for i in range(w.shape[0]):
            scores = [(abs(float(w[i, j])) * float((x[:, j] ** 2).mean().sqrt()), j) for j in range(w.shape[1])]
            for _, j in sorted(scores)[:pruned_count(0.5, w.shape[1])]:
                expected[i, j] = False
        assert torch.equal(decisions[f"{module_name}.weight"].mask, expected), module_name
    rewrite(gm)
    for n, p in layer.named_parameters():
        assert torch.equal(p, original[n]), f"{n} of the user's model was modified"
    for n, d in decisions.items():
        w = gm.get_parameter(n)
        assert torch.equal(w == 0, ~d.mask | (original[n] == 0))


def test_graph_questions_group_linears_by_shared_input_and_block():
    layer, acts = _layer_and_acts(0, [6])
    gm = export_layer(layer, (acts.hidden[0],), acts.layer_kwargs[0][0])
    info = analyse_linears(gm)
    q = info["self_attn.q_proj.weight"]
    assert set(q.shares_input_with) == {"self_attn.k_proj.weight", "self_attn.v_proj.weight"} and q.feeds_attention
    assert info["self_attn.o_proj.weight"].block == "attention" and not info["self_attn.o_proj.weight"].feeds_attention
    assert info["mlp.gate_proj.weight"].shares_input_with == ("mlp.up_proj.weight",)
    assert {i.block for n, i in info.items() if n.startswith("mlp.")} == {"mlp"}
    assert [weight_name(n) for n in linear_nodes(gm)][0] == "self_attn.q_proj.weight"


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_attention_observer_equals_eager_softmax_attention(kv_heads):
    model = tiny_llama(5, kv_heads=kv_heads)
    acts = random_activations(model, [9, 4], 5)
    layer = model.model.layers[0]
    gm = export_layer(layer, (acts.hidden[0],), acts.layer_kwargs[0][0])
    context = ObserverContext()
    attention = instrument(gm, InstrumentConfig(context)).info["attention"][0]
    rows = []
    with torch.no_grad():
        for j in range(len(acts)):
            context.labels = acts.labels[j]
            gm(acts.hidden[j], **acts.layer_kwargs[j][0])
            rows.append(attention.current)
    model.config._attn_implementation = "eager"
    probs = []
    hook = layer.self_attn.register_forward_hook(lambda m, i, out: probs.append(out[1]))
    _run(layer, acts)
    hook.remove()
    for row, p in zip(rows, probs):                    # p (1, H, N, N)
        assert torch.allclose(row, p[0, :, -1, :].mean(0), atol=1e-6)


def test_layers_of_one_structure_are_traced_once_and_bound_to_their_own_weights():
    from tamp_fx.capture.graph import LayerExporter
    model = tiny_llama(7, layers=3)
    acts = random_activations(model, [8, 5], 7)
    exporter = LayerExporter()
    for i, layer in enumerate(model.model.layers):
        gm = exporter(layer, (acts.hidden[0],), acts.layer_kwargs[0][i])
        fresh = export_layer(layer, (acts.hidden[0],), acts.layer_kwargs[0][i])
        assert all(gm.get_parameter(n) is p for n, p in layer.named_parameters())
        for j in range(len(acts)):
            with torch.no_grad():
                assert torch.equal(gm(acts.hidden[j], **acts.layer_kwargs[j][i]), fresh(acts.hidden[j], **acts.layer_kwargs[j][i]))
    assert exporter.exports == 1



def _exported_eager_and_sdpa(seed: int, seq_lens: list[int]):
    """Layer 0 of one tiny model exported with SDPA and with eager attention, and the observers' rows."""
    model = tiny_llama(seed)
    acts = random_activations(model, seq_lens, seed)
    layer = model.model.layers[0]
    out = {}
    for implementation in ("sdpa", "eager"):
        model.config._attn_implementation = implementation
        gm = export_layer(layer, (acts.hidden[0],), acts.layer_kwargs[0][0])
        context = ObserverContext()
        observed = instrument(gm, InstrumentConfig(context)).info
        rows = []
        with torch.no_grad():
            for j in range(len(acts)):
                context.labels = acts.labels[j]
                gm(acts.hidden[j], **acts.layer_kwargs[j][0])
                rows.append(observed["attention"][0].current)
        out[implementation] = (gm, observed, rows)
    return out


def test_eager_softmax_attention_is_found_by_graph_structure_and_observed():
    """An eager export has no SDPA node: the softmax of q k^T is the attention node, its linears
    are classified as with SDPA (v_proj included, through the probabilities-times-values matmul),
    and its observer's last-row attention equals the SDPA observer's."""
    from tamp_fx.capture.graph import ATTENTION_OPS, SOFTMAX_OPS, is_attention
    runs = _exported_eager_and_sdpa(3, [7, 11])
    eager_gm, eager_observed, eager_rows = runs["eager"]
    sdpa_gm, _, sdpa_rows = runs["sdpa"]
    attention = [n for n in eager_gm.graph.nodes if is_attention(n)]
    assert len(attention) == 1 and attention[0].target in SOFTMAX_OPS
    assert not any(n.target in ATTENTION_OPS for n in eager_gm.graph.nodes)
    assert analyse_linears(eager_gm) == analyse_linears(sdpa_gm) != {}
    for a, b in zip(eager_rows, sdpa_rows):
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-6)


def test_a_softmax_that_is_not_q_k_attention_is_not_attention():
    """softmax over a linear's output (a router, say) or over a product with a constant is no attention."""
    from tamp_fx.capture.graph import is_attention

    class Router(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gate = torch.nn.Linear(8, 4, bias=False)
            self.proj = torch.nn.Linear(8, 8, bias=False)
            self.register_buffer("table", torch.randn(8, 5))

        def forward(self, x):
            routed = torch.softmax(self.gate(x), -1)                 # no matmul of two linears
            mixed = torch.softmax(self.proj(x) @ self.table, -1)     # one side is no linear's output
            return routed.sum() + mixed.sum()

    gm = torch.export.export(Router(), (torch.randn(1, 3, 8),), strict=False).module()
    softmaxes = [n for n in gm.graph.nodes if "softmax" in str(n.target)]
    assert len(softmaxes) == 2 and not any(is_attention(n) for n in gm.graph.nodes)


def test_rewrite_composes_with_another_graph_pass_under_torch_fx_pass_manager():
    """tamp-fx's passes return torch.fx's PassResult, so a PassManager runs them beside others."""
    import functools

    from torch.fx.passes.infra.pass_base import PassResult as FxPassResult
    from torch.fx.passes.infra.pass_manager import PassManager

    from tamp_fx.passes.rewrite import RewriteConfig

    layer, acts = _layer_and_acts(5, [6, 9])
    gm = export_layer(layer, (acts.hidden[0],), acts.layer_kwargs[0][0])
    context = ObserverContext()
    observers = instrument(gm, InstrumentConfig(context)).info["linear"]
    _run(gm, acts, context)
    decisions = plan(gm, PlanPassConfig("wanda", {n: 0.5 for n in observers}, observers)).info["decisions"]
    linears_seen = []

    def count_linears(module):                                   # another pass: reads the graph, changes nothing
        linears_seen.append(len(linear_nodes(module)))
        return FxPassResult(module, False)

    result = PassManager([functools.partial(rewrite, config=RewriteConfig()), count_linears])(gm)
    assert isinstance(result, FxPassResult) and result.modified
    assert linears_seen == [7]
    assert not any(str(n.target).startswith(OBSERVER_PREFIX) for n in result.graph_module.graph.nodes)
    for name, d in decisions.items():
        assert torch.equal(result.graph_module.get_parameter(name) != 0, d.mask & (layer.get_parameter(name) != 0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linears_reading_one_tensor_share_one_statistic_equal_to_a_float64_recomputation(dtype):
    import functools

    from tamp_fx.statistics.observers import LinearObserver
    layer, acts = _layer_and_acts(5, [9, 14, 6])
    layer = layer.to(dtype)
    cast = lambda t: t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t   # noqa: E731
    acts.hidden = [cast(h) for h in acts.hidden]
    acts.layer_kwargs = [[torch.utils._pytree.tree_map(cast, kw) for kw in kws] for kws in acts.layer_kwargs]
    seen = _linear_inputs(layer, acts)
    for hessian in (False, True):                                        # Wanda's norms, SparseGPT's Hessian
        gm = export_layer(layer, (acts.hidden[0],), acts.layer_kwargs[0][0])
        context = ObserverContext()
        observers = instrument(gm, InstrumentConfig(context, functools.partial(LinearObserver, hessian=hessian))).info["linear"]
        _run(gm, acts, context)
        q, k, v = (observers[f"self_attn.{p}_proj.weight"] for p in "qkv")
        gate, up, down = (observers[f"mlp.{p}_proj.weight"] for p in ("gate", "up", "down"))
        assert q.stats is k.stats is v.stats and gate.stats is up.stats and down.stats is not gate.stats   # once per group
        for name, inputs in seen.items():
            x = torch.cat(inputs).double()                               # (T, C_in): the layer's own inputs, exactly
            stats = observers[f"{name}.weight"].stats
            assert stats.n_tokens == x.shape[0]
            if hessian:                                                  # SparseGPT reads the Hessian alone
                assert stats.sum_sq is None
                torch.testing.assert_close(stats.hessian().double(), 2 * x.T @ x / x.shape[0], rtol=1e-5, atol=1e-6)
            else:
                torch.testing.assert_close(stats.sum_sq, (x * x).sum(0), rtol=1e-6, atol=1e-9)


def test_sparsegpt_decides_linears_that_share_a_hessian_in_one_sweep_as_each_alone(monkeypatch):
    import functools

    from tamp_fx.prune import scores
    from tamp_fx.prune.sparsegpt import sparsegpt_prune
    from tamp_fx.statistics.observers import LinearObserver
    layer, acts = _layer_and_acts(8, [9, 14])
    gm = export_layer(layer, (acts.hidden[0],), acts.layer_kwargs[0][0])
    context = ObserverContext()
    observers = instrument(gm, InstrumentConfig(context, functools.partial(LinearObserver, hessian=True))).info["linear"]
    _run(gm, acts, context)
    sweeps = []
    shared = scores.sparsegpt_prune_shared
    monkeypatch.setattr(scores, "sparsegpt_prune_shared", lambda weights, *a, **k: sweeps.append(len(weights)) or shared(weights, *a, **k))
    targets = {n: 0.3 + 0.05 * i for i, n in enumerate(observers)}            # a sparsity of its own each
    weights = {n: gm.get_parameter(n).detach().clone() for n in observers}
    decisions = plan(gm, PlanPassConfig("sparsegpt", targets, observers)).info["decisions"]
    assert sorted(sweeps) == [1, 1, 2, 3]                                     # o, down; gate/up; q/k/v
    assert list(decisions) == list(observers)                                 # graph order
    for name, d in decisions.items():
        new_weight, keep = sparsegpt_prune(weights[name], observers[name].stats.hessian(), targets[name])
        assert torch.equal(d.mask, keep), name
        torch.testing.assert_close(d.new_weight, new_weight, rtol=0, atol=0)


def test_observers_that_select_tokens_by_their_outputs_keep_their_own_statistics():
    import functools

    from tamp_fx.statistics.observers import Chosen, LinearObserver
    layer, acts = _layer_and_acts(6, [8, 5])
    gm = export_layer(layer, (acts.hidden[0],), acts.layer_kwargs[0][0])
    first_half = lambda z, attention, labels, context: Chosen(torch.arange(z.shape[0] // 2))   # noqa: E731
    observers = instrument(gm, InstrumentConfig(ObserverContext(), functools.partial(LinearObserver, selector=first_half))).info["linear"]
    stats = [o.stats for o in observers.values()]
    assert len({id(s) for s in stats}) == len(stats)


def test_a_planned_layer_frees_its_weights_without_the_garbage_collector(monkeypatch):
    import gc
    import weakref

    from tamp_fx.capture.graph import LayerExporter, drop_tensors
    layer, acts = _layer_and_acts(7, [6])
    exporter = LayerExporter()
    gm = exporter(layer, (acts.hidden[0],), acts.layer_kwargs[0][0])
    observers = instrument(gm, InstrumentConfig(ObserverContext())).info["linear"]
    _run(gm, acts)
    plan(gm, PlanPassConfig("wanda", {n: 0.5 for n in observers}, observers))
    rewrite(gm)                                           # new (masked) weights that only gm holds
    rewritten = weakref.ref(gm.get_parameter("mlp.down_proj.weight"))
    gc.disable()
    try:
        drop_tensors(gm)
        assert rewritten() is None                        # freed by reference counting, not by a collection
    finally:
        gc.enable()
