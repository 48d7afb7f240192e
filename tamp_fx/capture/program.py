"""The decoder layers of an exported program, for the layer-by-layer driver (DESIGN.md §3).

``torch.export.unflatten`` gives back the program's module hierarchy as InterpreterModules.
The decoder layers are found by structure, not by name: a run (at least two) of consecutive
sibling submodules with the same parameter shapes that hold ``aten.linear`` nodes and are
called one after the other, each taking the output of the one before (of several such runs,
the one holding the most parameters). Layers of different shapes in one decoder (alternating
dense and mixture-of-experts layers, say) do not form one run and are not found. Each layer is then one flat ATen graph
(:func:`flat_layer`), called as ``layer(hidden, **other_inputs)`` like a Hugging Face layer,
with parameter names relative to the layer; its full names (``names[i] + "." + name``) are
the program's state-dict names. :class:`ProgramLayers` hands them to the driver.

:func:`capture_program_inputs` runs the program on every calibration sample up to the last
layer, recording what each layer is called with, so the driver can plan the layers in order
on the pruned outputs of the one before.
"""
from __future__ import annotations

import contextlib
import copy
import operator
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
from torch.export import ExportedProgram

from tamp_fx.capture.activations import Activations
from tamp_fx.capture.graph import is_linear
from tamp_fx.capture.record import recording, run
from tamp_fx.errors import TampError, first_line
from tamp_fx.load.fingerprint import fingerprint_sample

LOOKED_FOR = ("a run of at least two sibling submodules with the same parameter shapes, holding aten.linear "
              "nodes, each called on the output of the one before")


def _graph_modules(module: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in module.modules() if isinstance(getattr(m, "graph", None), torch.fx.Graph)]


def _has_linear(module: torch.nn.Module) -> bool:
    return any(is_linear(n) for m in _graph_modules(module) for n in m.graph.nodes)


def _signature(module: torch.nn.Module) -> tuple:
    return tuple((tuple(p.shape), p.dtype) for p in module.parameters())


def _runs(root: torch.nn.Module) -> list[tuple[str, list[str]]]:
    """Every maximal run of >= 2 consecutive same-signature siblings with linears: (parent, child names)."""
    runs = []
    for parent_name, parent in root.named_modules():
        children = list(parent.named_children())
        start = 0
        while start < len(children):
            end = start + 1
            sig = _signature(children[start][1])
            while end < len(children) and _signature(children[end][1]) == sig:
                end += 1
            names = [n for n, _ in children[start:end]]
            if end - start >= 2 and sig and _has_linear(children[start][1]):
                runs.append((parent_name, names))
            start = end
    return runs


def _call_sites(root: torch.nn.Module) -> dict[str, tuple[torch.nn.Module, torch.fx.Node]]:
    """Full module name -> (the module whose graph calls it, the call_module node)."""
    sites = {}
    for owner_name, owner in root.named_modules():
        if not isinstance(getattr(owner, "graph", None), torch.fx.Graph):
            continue
        for node in owner.graph.nodes:
            if node.op == "call_module":
                sites[f"{owner_name}.{node.target}" if owner_name else str(node.target)] = (owner, node)
    return sites


@dataclass(frozen=True)
class ProgramLayout:
    """The decoder layers of a program and how they are called."""

    root: torch.nn.Module                  # the unflattened program
    names: tuple[str, ...]                 # full module name of every layer, in call order
    hidden_index: int                      # position of the hidden states among a layer's inputs
    output_index: int | None               # which of a layer's outputs is the hidden state (None: its only output)
    layers: tuple[torch.fx.GraphModule, ...]  # flat ATen graph of every layer (:func:`flat_layer`)
    prefix: str                            # the module holding them (plan.json's "decoder")


def _chain(names: list[str], sites: dict) -> tuple[int, int | None] | None:
    """(hidden input position, output index) if layer i+1 takes layer i's output for every i."""
    if any(n not in sites for n in names) or len({id(sites[n][0]) for n in names}) != 1:
        return None
    hidden_index, output_index = None, None
    for before, after in zip(names, names[1:]):
        prev, node = sites[before][1], sites[after][1]
        found = None
        for position, arg in enumerate(node.args):
            if arg is prev:
                found = (position, None)
            elif (isinstance(arg, torch.fx.Node) and arg.op == "call_function" and arg.target is operator.getitem
                  and arg.args[0] is prev):
                found = (position, arg.args[1])
        if found is None or (hidden_index is not None and found != (hidden_index, output_index)):
            return None
        hidden_index, output_index = found
    return hidden_index, output_index


def program_layout(ep: ExportedProgram, path: str = "the program") -> ProgramLayout:
    """Find the decoder layers of ``ep`` (module docstring), or one line saying what was looked for."""
    root = torch.export.unflatten(ep)
    sites = _call_sites(root)
    candidates = []
    for parent, children in _runs(root):
        names = [f"{parent}.{c}" if parent else c for c in children]
        chain = _chain(names, sites)
        if chain is not None:
            size = sum(p.numel() for n in names for p in root.get_submodule(n).parameters())
            candidates.append((size, names, chain))
    if not candidates:
        raise TampError(f"found no decoder layers in {path}: looked for {LOOKED_FOR}")
    _, names, (hidden_index, output_index) = max(candidates, key=lambda c: c[0])
    layers = tuple(flat_layer(root.get_submodule(n), hidden_index, output_index) for n in names)
    return ProgramLayout(root, tuple(names), hidden_index, output_index, layers, names[0].rpartition(".")[0])


def _inline(module: torch.nn.Module, graph: torch.fx.Graph, inputs: Sequence[Any], prefix: str) -> Any:
    """Copy ``module``'s graph into ``graph`` on ``inputs``, inlining the submodules it calls;
    return what its output node returns (nodes of ``graph``)."""
    env: dict[torch.fx.Node, Any] = {}
    args = iter(inputs)
    for node in module.graph.nodes:
        if node.op == "placeholder":
            env[node] = next(args)
        elif node.op == "get_attr":
            env[node] = graph.get_attr(prefix + str(node.target))
            env[node].meta = dict(node.meta)
        elif node.op == "call_module":
            if node.kwargs:
                raise TampError(f"cannot inline {prefix}{node.target}: called with keyword arguments")
            sub_inputs = torch.fx.node.map_arg(node.args, lambda n: env[n])
            env[node] = _inline(module.get_submodule(str(node.target)), graph, sub_inputs, f"{prefix}{node.target}.")
        elif node.op == "output":
            return torch.fx.node.map_arg(node.args[0], lambda n: env[n])
        elif node.target is operator.getitem and isinstance(env.get(node.args[0]), (tuple, list)):
            env[node] = env[node.args[0]][node.args[1]]      # an output of an inlined submodule
        else:
            env[node] = graph.node_copy(node, lambda n: env[n])
    raise TampError(f"the graph of {prefix or 'a layer'} has no output")


def flat_layer(layer: torch.nn.Module, hidden_index: int, output_index: int | None) -> torch.fx.GraphModule:
    """One ATen graph of an unflattened layer and everything it calls, taking the hidden states
    first and the other inputs by their placeholder names, returning the hidden state output.
    Its parameters are the layer's own (shared, named relative to it)."""
    graph = torch.fx.Graph()
    placeholders = [n for n in layer.graph.nodes if n.op == "placeholder"]
    order = [placeholders[hidden_index]] + [p for i, p in enumerate(placeholders) if i != hidden_index]
    new = {}
    for p in order:
        new[p] = graph.placeholder(p.name)
        new[p].meta = dict(p.meta)
    out = _inline(layer, graph, [new[p] for p in placeholders], "")
    if output_index is not None:
        out = out[output_index]
    graph.output(out)
    graph.eliminate_dead_code()
    gm = torch.fx.GraphModule(layer, graph)
    gm.input_names = tuple(p.name for p in order[1:])  # the other inputs, by keyword
    return gm


class ProgramLayers:
    """The driver's :class:`tamp_fx.capture.layers.DecoderLayers` over a program's layers: resident, on the CPU."""

    device = torch.device("cpu")

    def __init__(self, layout: ProgramLayout) -> None:
        self.layout = layout
        self.dtype = next((p.dtype for layer in layout.layers for p in layer.parameters() if p.is_floating_point()),
                          torch.float32)          # as stored
        self.fingerprints = {f"{name}.{w}": fingerprint_sample(p) for name, layer in zip(layout.names, layout.layers)
                             for w, p in layer.named_parameters() if p.dim() == 2}

    def __len__(self) -> int:
        return len(self.layout.layers)

    def prefix(self, index: int) -> str:
        return self.layout.names[index]

    @contextlib.contextmanager
    def open(self, index: int) -> Iterator[torch.fx.GraphModule]:
        yield self.layout.layers[index]


class ProgramLayerExporter:
    """The driver's exporter for program layers: a fresh copy of the layer's flat graph
    (instrument and rewrite change the copy, the parameters are the program's)."""

    exports = 0

    def __call__(self, layer: torch.fx.GraphModule, args: tuple, kwargs: dict[str, Any]) -> torch.fx.GraphModule:
        return torch.fx.GraphModule(layer, copy.deepcopy(layer.graph))


@torch.no_grad()
def capture_program_inputs(layout: ProgramLayout, samples: Sequence, progress=None) -> Activations:
    """Run the program on every sample (``.args``, ``.labels``) up to its last decoder layer and
    record each layer's inputs (:func:`~tamp_fx.capture.record.recording`): hidden states pass
    through a layer whose only output they are (the other inputs of later layers do not depend
    on them), else the layer runs; the last layer stops the forward pass."""
    acts = Activations()

    def respond(layer: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
        return args[layout.hidden_index] if layout.output_index is None else layer(*args)

    with recording(layout.root, layout.names, respond=respond, stop=True) as calls:
        for j, sample in enumerate(samples):
            calls.clear()
            try:
                run(layout.root, *sample.args)
            except Exception as error:  # noqa: BLE001
                raise TampError(f"the exported program failed on calibration sample {j} ({first_line(error)}): "
                                "do the sample's inputs match what the program takes?") from error
            if len(calls) != len(layout.names):
                raise TampError(f"calibration sample {j} called {len(calls)} of the {len(layout.names)} decoder layers "
                                "of the program: the layers must run once each, in order")
            hidden = calls[0][0][layout.hidden_index]
            tokens = hidden.shape[:-1].numel()
            if sample.labels is not None and sample.labels.numel() != tokens:
                raise TampError(f"calibration sample {j} has {sample.labels.numel()} labels but {tokens} tokens "
                                "reach the decoder layers: give one label per token")
            labels = sample.labels if sample.labels is not None else torch.zeros(tokens, dtype=torch.int8)
            acts.add(hidden.detach(),
                     [dict(zip(layer.input_names, [a for k, a in enumerate(args) if k != layout.hidden_index]))
                      for layer, (args, _) in zip(layout.layers, calls)],
                     labels.reshape(-1).to(torch.int8))
            if progress is not None:
                progress()
    return acts
