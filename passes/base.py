"""The pass contract: ``(gm, config) -> PassResult(gm, modified)``."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch.fx

from tamp_fx.errors import TampError

#: node.meta key under which the plan pass leaves its decision for the rewrite pass.
DECISION_KEY = "tamp_fx.decision"
#: prefix of the submodule names the instrument pass adds.
OBSERVER_PREFIX = "tamp_fx_observer_"


@dataclass
class PassResult:
    gm: torch.fx.GraphModule
    modified: bool
    info: dict[str, Any] = field(default_factory=dict)


class PassError(TampError):
    """A pass met a node it cannot handle; the message names the pass and the node."""

    def __init__(self, pass_name: str, node: torch.fx.Node, problem: str) -> None:
        super().__init__(f"{pass_name} pass: {problem} at node {node.format_node()}")
