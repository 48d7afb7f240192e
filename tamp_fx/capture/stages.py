"""A layer's graph run one stage at a time over all calibration samples.

Stage ``k`` ends just before the first linear of the ``k``-th group of linears that read one
tensor (q/k/v, o, gate/up, down), so the driver can plan that group from what its observers saw
(they sit before it, :mod:`tamp_fx.passes.instrument`) and rewrite its weights before the next
stage computes its outputs: every linear of the layer runs once, already pruned, and each group
is planned on the outputs of the groups before it (one pass per layer instead of two).

Each sample keeps its own environment between stages: the values later nodes still need (the
residual stream and the next group's input), the rest dropped as soon as its last reader ran.
Weights are read from the graph module when a node that reads them runs, so a rewritten weight
counts at once.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.fx
import torch.utils._pytree as pytree

from tamp_fx.capture.graph import linears_by_input, weight_name

Env = dict[torch.fx.Node, Any]


class Stages:
    """The stages of ``gm`` (an exported, instrumented layer graph that must not change while
    they run). ``groups[k]``: the weight names of the linears stage ``k`` stops before."""

    def __init__(self, gm: torch.fx.GraphModule) -> None:
        self.gm = gm
        self.nodes = list(gm.graph.nodes)
        position = {node: i for i, node in enumerate(self.nodes)}
        groups = list(linears_by_input(gm.graph).values())    # in the order of their first linear
        self.groups: list[list[str]] = [[weight_name(n) for n in group] for group in groups]
        self.bounds = [0, *(position[group[0]] for group in groups), len(self.nodes)]   # stage k: nodes[bounds[k]:bounds[k+1]]
        self._dying: list[list[torch.fx.Node]] = [[] for _ in self.nodes]          # values whose last reader is node i
        for node in self.nodes:
            last = max((position[user] for user in node.users), default=position[node])
            self._dying[last].append(node)
        self._placeholders = [n for n in self.nodes if n.op == "placeholder"]
        self._interpreter = torch.fx.Interpreter(gm, garbage_collect_values=False)

    def __len__(self) -> int:
        """Stages: one before each group, and the last, which ends at the graph's output."""
        return len(self.bounds) - 1

    def start(self, args: tuple, kwargs: dict[str, Any]) -> Env:
        """A sample's environment before stage 0: the graph's inputs."""
        leaves = pytree.tree_leaves((args, kwargs))
        if len(leaves) != len(self._placeholders):
            raise ValueError(f"the layer graph takes {len(self._placeholders)} inputs, got {len(leaves)}")
        return dict(zip(self._placeholders, leaves))

    def run(self, env: Env, stage: int) -> Any:
        """Run stage ``stage`` on a sample's environment (updated in place); the last stage returns
        the layer's outputs, as the graph module would."""
        interpreter = self._interpreter
        interpreter.env = env
        result = None
        for i in range(self.bounds[stage], self.bounds[stage + 1]):
            node = self.nodes[i]
            if node.op == "output":
                flat = torch.fx.node.map_arg(node.args[0], env.__getitem__)
                result = self.gm.graph._codegen.process_outputs(flat)
            elif node.op not in ("placeholder", "get_attr"):
                for tensor in node.all_input_nodes:            # weights as they are now, not as stage 0 saw them
                    if tensor.op == "get_attr":
                        env[tensor] = interpreter.fetch_attr(tensor.target)
                env[node] = interpreter.run_node(node)
            for dead in self._dying[i]:
                env.pop(dead, None)
        return result
