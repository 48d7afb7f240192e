"""Instrument pass: an observer at every linear node and at every attention node (SDPA: its q,
k, mask and scale; an eager ``softmax(q k^T)``: the probabilities it computes).

A linear's observer reads (input, output) after the linear; one whose statistics depend on the
input alone (:attr:`~tamp_fx.statistics.observers.LinearObserver.input_only`) reads the input
before the first linear that reads it, so a group of linears sharing an input is observed
before any of them runs (:mod:`tamp_fx.capture.stages` plans such a group there)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch.fx

from tamp_fx.capture.graph import is_attention, is_eager_attention, is_linear, linears_by_input, weight_name
from tamp_fx.passes.base import OBSERVER_PREFIX, PassResult
from tamp_fx.statistics.observers import AttentionObserver, LinearObserver, ObserverContext


@dataclass(frozen=True)
class InstrumentConfig:
    context: ObserverContext
    #: builds the observer placed after a linear (what it collects depends on the method)
    linear_observer: Callable[[ObserverContext], LinearObserver] = field(default=LinearObserver)


def _sdpa_scale(node: torch.fx.Node) -> float | None:
    return node.kwargs.get("scale", node.args[6] if len(node.args) > 6 else None)


def instrument(gm: torch.fx.GraphModule, config: InstrumentConfig) -> PassResult:
    """Insert observers; returns ``info["linear"]`` (weight name -> LinearObserver) and
    ``info["attention"]`` (list of AttentionObserver). Graph outputs are unchanged. Linears that
    read the same tensor (q/k/v, gate/up) share one input statistic when their observers
    collect nothing else (:meth:`LinearObserver.share_inputs`): it is computed once per group."""
    linear_observers: dict[str, LinearObserver] = {}
    attention_observers: list[AttentionObserver] = []
    by_input = linears_by_input(gm.graph)
    for node in list(gm.graph.nodes):
        place = gm.graph.inserting_after(node)
        if is_linear(node):
            observer = config.linear_observer(config.context)
            first = by_input[node.args[0]][0]                # the first linear reading this input: observed already
            owner = linear_observers.get(weight_name(first), observer)
            if owner is not observer and owner.input_only and observer.input_only:
                observer.share_inputs(owner)
            name = f"{OBSERVER_PREFIX}{len(linear_observers) + len(attention_observers)}"
            linear_observers[weight_name(node)] = observer
            if observer.input_only:
                args, place = (node.args[0],), gm.graph.inserting_before(first)
            else:
                args = (node.args[0], node)
        elif is_attention(node):
            observer = AttentionObserver(config.context)
            name = f"{OBSERVER_PREFIX}{len(linear_observers) + len(attention_observers)}"
            attention_observers.append(observer)
            if is_eager_attention(node):                     # the probabilities themselves
                args = (None, None, None, None, node)
            else:
                mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
                args = (node.args[0], node.args[1], mask, _sdpa_scale(node))
        else:
            continue
        gm.add_submodule(name, observer)
        with place:
            gm.graph.call_module(name, args)
    gm.graph.lint()
    gm.recompile()
    return PassResult(gm, modified=bool(linear_observers or attention_observers),
                      info={"linear": linear_observers, "attention": attention_observers})
