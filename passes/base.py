"""The pass contract: ``(gm, config) -> PassResult(graph_module, modified)``, torch.fx's own
:class:`torch.fx.passes.infra.pass_base.PassResult`, with what the pass found in ``info``.

Bind a config to run a pass under torch.fx's ``PassManager`` beside other graph passes::

    PassManager([functools.partial(rewrite, config=RewriteConfig()), other_pass])(gm)
"""
from __future__ import annotations

from typing import Any

import torch.fx
from torch.fx.passes.infra import pass_base

from tamp_fx.errors import TampError

#: node.meta key under which the plan pass leaves its decision for the rewrite pass.
DECISION_KEY = "tamp_fx.decision"
#: prefix of the submodule names the instrument pass adds.
OBSERVER_PREFIX = "tamp_fx_observer_"


class PassResult(pass_base.PassResult):
    """torch.fx's ``PassResult(graph_module, modified)``; ``info``: what the pass found (observers,
    decisions), for the caller."""

    def __new__(cls, graph_module: torch.fx.GraphModule, modified: bool, info: dict[str, Any] | None = None):
        result = super().__new__(cls, graph_module, modified)
        result.info = info if info is not None else {}
        return result


class PassError(TampError):
    """A pass met a node it cannot handle; the message names the pass and the node."""

    def __init__(self, pass_name: str, node: torch.fx.Node, problem: str) -> None:
        super().__init__(f"{pass_name} pass: {problem} at node {node.format_node()}")
