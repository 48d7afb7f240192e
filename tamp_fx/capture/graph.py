"""Graph capture: torch.export of one decoder layer, op sets, and the graph questions asked of it.

Nodes are matched by op (``aten.linear``, ``aten.scaled_dot_product_attention``), never by
module name, so one code path serves Llama, Qwen2, Mistral and Gemma decoders alike.
"""
from __future__ import annotations

import copy
import inspect
import logging
import warnings
from dataclasses import dataclass
from typing import Any

import networkx as nx
import torch
import torch.fx
import torch.utils._pytree as pytree
from torch.export import Dim

from tamp_fx.errors import TampError, first_line

log = logging.getLogger(__name__)

LINEAR_OPS = frozenset({torch.ops.aten.linear.default})
ATTENTION_OPS = frozenset({torch.ops.aten.scaled_dot_product_attention.default})


def is_linear(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and node.target in LINEAR_OPS


SOFTMAX_OPS = frozenset({torch.ops.aten.softmax.int, torch.ops.aten._softmax.default, torch.ops.aten._safe_softmax.default})
MATMUL_OPS = frozenset({torch.ops.aten.matmul.default, torch.ops.aten.bmm.default})


def is_attention(node: torch.fx.Node) -> bool:
    """An attention node: ``aten.scaled_dot_product_attention``, or the softmax of an eager
    ``softmax(q k^T)`` (:func:`is_eager_attention`)."""
    return (node.op == "call_function" and node.target in ATTENTION_OPS) or is_eager_attention(node)


def _is_matmul(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and node.target in MATMUL_OPS


def _nearest(start: torch.fx.Node, step, found, stop) -> torch.fx.Node | None:
    """The first node ``found`` accepts, searching from ``start`` along ``step`` (node -> nodes)
    without passing a node ``stop`` accepts."""
    frontier, seen = list(step(start)), set()
    while frontier:
        node = frontier.pop(0)
        if node in seen:
            continue
        seen.add(node)
        if found(node):
            return node
        if not stop(node):
            frontier.extend(step(node))
    return None


def _inputs(node: torch.fx.Node) -> list[torch.fx.Node]:
    return list(node.all_input_nodes)


def _from_linear(node: torch.fx.Node) -> bool:
    return is_linear(node) or _nearest(node, _inputs, is_linear, lambda n: False) is not None


def is_eager_attention(node: torch.fx.Node) -> bool:
    """A softmax whose input derives (through no other matmul or softmax) from a matmul of two
    tensors that both come from linears: the scores ``q k^T`` of eager attention."""
    if not (node.op == "call_function" and node.target in SOFTMAX_OPS):
        return False
    scores = _nearest(node, _inputs, _is_matmul, lambda n: n.target in SOFTMAX_OPS or is_linear(n))
    return scores is not None and all(_from_linear(a) for a in scores.args[:2] if isinstance(a, torch.fx.Node))


def attention_output(node: torch.fx.Node) -> torch.fx.Node:
    """Where an attention node's result leaves it: the node itself for SDPA; for an eager softmax
    the matmul of the probabilities with the values (the softmax itself if there is none)."""
    if node.target in ATTENTION_OPS:
        return node
    return _nearest(node, lambda n: list(n.users), _is_matmul, lambda n: is_linear(n) or n.target in SOFTMAX_OPS) or node


def _dynamic_spec(x: Any) -> Any:
    """Every dimension larger than one may vary (sequence length); size-1 dims (batch) stay static."""
    if isinstance(x, torch.Tensor):
        return {i: Dim.AUTO for i, size in enumerate(x.shape) if size > 1} or None
    return None


def export_layer(layer: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> torch.fx.GraphModule:
    """Export ``layer`` called as ``layer(*args, **kwargs)`` to an ATen GraphModule whose
    sequence dimension is dynamic, so one graph serves calibration samples of any length.

    The returned module shares parameter storage with ``layer``: passes must replace
    parameters, never write into them.
    """
    bound = inspect.signature(layer.forward).bind(*args, **kwargs)
    dynamic = {name: pytree.tree_map(_dynamic_spec, value) for name, value in bound.arguments.items()}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            ep = torch.export.export(layer, args, kwargs, dynamic_shapes=dynamic, strict=False)
        except Exception as dyn_error:  # noqa: BLE001 - fall back to a static graph for this shape
            log.debug("dynamic export failed (%s); exporting with static shapes", dyn_error)
            try:
                ep = torch.export.export(layer, args, kwargs, strict=False)
            except Exception as error:  # noqa: BLE001
                raise TampError(f"torch.export could not trace decoder layer {type(layer).__name__}: "
                                f"{first_line(error)}") from error
    gm = ep.module()
    if not any(is_linear(n) for n in gm.graph.nodes):
        raise TampError(f"decoder layer {type(layer).__name__} exported without any aten.linear node: nothing to prune")
    return gm


def drop_tensors(gm: torch.nn.Module) -> None:
    """Let go of the tensors ``gm`` and its submodules hold (a layer's weights, rewritten or not)
    and of the submodules themselves (observers, with their statistics: a Hessian per input).
    fx graph modules sit in reference cycles, so without this they would wait for the garbage
    collector, and layers would pile up in memory between its runs."""
    for module in list(gm.modules()):
        module._parameters.clear()
        module._buffers.clear()
        module._modules.clear()


def weight_name(node: torch.fx.Node) -> str:
    """The parameter name (relative to the layer) of a linear node's weight."""
    weight = node.args[1]
    if not (isinstance(weight, torch.fx.Node) and weight.op == "get_attr"):
        raise TampError(f"linear node's weight is not a parameter: {node.format_node()}")
    return str(weight.target)


def linear_nodes(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if is_linear(n)]


def linears_by_input(graph: torch.fx.Graph) -> dict[torch.fx.Node, list[torch.fx.Node]]:
    """The linear nodes of ``graph`` grouped by the tensor they read (q/k/v, gate/up), each group
    in graph order, the groups in the order of their first linear."""
    groups: dict[torch.fx.Node, list[torch.fx.Node]] = {}
    for node in graph.nodes:
        if is_linear(node):
            groups.setdefault(node.args[0], []).append(node)
    return groups


def to_networkx(graph: torch.fx.Graph) -> nx.DiGraph:
    """The data-flow graph of ``graph`` as a networkx DiGraph over its nodes."""
    g = nx.DiGraph()
    for node in graph.nodes:
        g.add_node(node)
        for user in node.users:
            g.add_edge(node, user)
    return g


@dataclass(frozen=True)
class LinearInfo:
    """What the graph says about one linear: its weight, who shares its input, where it sits."""

    weight: str                   # parameter name relative to the layer
    shares_input_with: tuple[str, ...]
    feeds_attention: bool         # an ancestor of an attention node (q, k, v projections)
    block: str                    # "attention" (projections into and out of attention) or "mlp"


def analyse_linears(gm: torch.fx.GraphModule) -> dict[str, LinearInfo]:
    """Answer the graph questions about every linear of a layer, keyed by weight name.

    q/k/v are the linears upstream of an attention node's output (SDPA, or the probabilities-
    times-values matmul of an eager softmax); the output projection is a linear reached from it
    without passing another linear; the rest is the MLP.
    """
    g = to_networkx(gm.graph)
    linears = linear_nodes(gm)
    attentions = [attention_output(n) for n in gm.graph.nodes if is_attention(n)]
    upstream = set().union(*(nx.ancestors(g, a) for a in attentions)) if attentions else set()
    linear_set = set(linears)
    out_projections: set[torch.fx.Node] = set()
    for attention in attentions:
        # breadth-first from the attention node, stopping at the first linear on each path
        frontier, seen = [attention], {attention}
        while frontier:
            node = frontier.pop()
            for user in g.successors(node):
                if user in seen:
                    continue
                seen.add(user)
                if user in linear_set:
                    out_projections.add(user)
                else:
                    frontier.append(user)
    by_input = linears_by_input(gm.graph)
    info = {}
    for node in linears:
        name = weight_name(node)
        siblings = tuple(weight_name(n) for n in by_input[node.args[0]] if n is not node)
        feeds = node in upstream
        block = "attention" if feeds or node in out_projections else "mlp"
        info[name] = LinearInfo(name, siblings, feeds, block)
    return info


def _structure_key(layer: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple:
    """What a layer's graph depends on besides tensor values and sequence lengths."""
    tensors = tuple((n, tuple(t.shape), t.dtype) for n, t in
                    [*layer.named_parameters(remove_duplicate=False), *layer.named_buffers(remove_duplicate=False)])
    leaves, spec = pytree.tree_flatten((args, kwargs))
    inputs = tuple((x.dtype, x.dim(), x.device.type) if isinstance(x, torch.Tensor) else repr(x) for x in leaves)
    return type(layer), tensors, str(spec), inputs


def _same_outputs(a: Any, b: Any) -> bool:
    """Whether a reused graph computes what the eager layer does, up to rounding of the dtype."""
    fa, fb = pytree.tree_leaves(a), pytree.tree_leaves(b)
    return len(fa) == len(fb) and all(_close(x, y) if isinstance(x, torch.Tensor) else x == y for x, y in zip(fa, fb))


def _close(x: torch.Tensor, y: torch.Tensor) -> bool:
    eps = torch.finfo(x.dtype).eps if x.is_floating_point() else 0.0
    return torch.allclose(x, y, rtol=max(1e-4, 8 * eps), atol=max(1e-5, 8 * eps))


class LayerExporter:
    """Exports decoder layers, tracing once per distinct layer structure.

    Decoder layers of one model usually share their code and shapes; tracing costs far more
    than running a layer, so a later layer gets a copy of an earlier layer's graph bound to
    its own parameters, checked against the eager layer on the sample it was given. A layer
    whose outputs differ (other control flow) is exported afresh. Templates hold meta-device
    stand-ins, never a layer's weights, so a layer's memory is freed when it is released.
    """

    def __init__(self) -> None:
        self._templates: dict[tuple, tuple[torch.fx.GraphModule, dict[str, torch.Tensor]]] = {}
        self._verified: set[tuple[int, tuple]] = set()   # (id(layer), structure) already checked
        self.exports = 0

    def __call__(self, layer: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> torch.fx.GraphModule:
        key = _structure_key(layer, args, kwargs)
        if key in self._templates:
            template, stand_ins = self._templates[key]
            gm = _rebind(template, stand_ins, _tensors(layer))
            if (id(layer), key) in self._verified:
                return gm
            with torch.no_grad():
                if _same_outputs(gm(*args, **kwargs), layer(*args, **kwargs)):
                    self._verified.add((id(layer), key))
                    return gm
            log.debug("reused graph of %s differs from the eager layer: exporting afresh", type(layer).__name__)
        gm = export_layer(layer, args, kwargs)
        self.exports += 1
        tensors = _tensors(layer)
        stand_ins = {name: t.detach().to("meta") for name, t in tensors.items()}  # detached: no autograd edge to t
        self._templates[key] = (_rebind(gm, tensors, stand_ins), stand_ins)
        self._verified.add((id(layer), key))
        return gm


def _tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return dict([*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)])


def _rebind(gm: torch.fx.GraphModule, source: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> torch.fx.GraphModule:
    """A deep copy of ``gm`` (graph and modules) whose tensors ``source`` (by name) are ``target``'s."""
    memo = {id(tensor): target[name] for name, tensor in source.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch's pytree spec pickling
        return copy.deepcopy(gm, memo)
