"""Rewrite pass: apply the plan pass's decisions to the weights, remove the observers."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx

from tamp_fx.passes.base import DECISION_KEY, OBSERVER_PREFIX, PassError, PassResult
from tamp_fx.prune.masks import apply_mask
from tamp_fx.prune.semi_structured import require_cuda, to_semi_structured


@dataclass(frozen=True)
class RewriteConfig:
    remove_observers: bool = True
    #: Make each masked weight a CUDA 2:4 ``SparseSemiStructuredTensor`` (float16 / bfloat16: the
    #: weight's own dtype, else bfloat16), so the graph runs the sparse kernels. Move the graph to
    #: CUDA in float16 / bfloat16 before the pass, and feed it inputs of that dtype. Needs a GPU of
    #: compute capability 8.0+. Decisions of pattern "dense" keep their dense weight.
    semi_structured: bool = False


def _replace_parameter(gm: torch.fx.GraphModule, name: str, value: torch.Tensor) -> None:
    """Swap in a new Parameter: the exported module shares storage with the user's model,
    which must never be written."""
    owner_name, _, attr = name.rpartition(".")
    owner = gm.get_submodule(owner_name)
    setattr(owner, attr, torch.nn.Parameter(value, requires_grad=False))


def apply_decision(gm: torch.fx.GraphModule, node: torch.fx.Node, semi_structured: bool = False) -> bool:
    """Give the linear ``node`` the weights the plan pass decided for it (in ``node.meta``), once:
    the decision is taken out of the node. Returns whether there was one. The graph is unchanged."""
    decision = node.meta.pop(DECISION_KEY, None)
    if decision is None:
        return False
    weight = gm.get_parameter(decision.weight)
    if tuple(weight.shape) != tuple(decision.mask.shape):
        raise PassError("rewrite", node, f"mask shape {tuple(decision.mask.shape)} does not match weight {tuple(weight.shape)}")
    mask = decision.mask.to(weight.device)
    value = weight.detach() if decision.new_weight is None else decision.new_weight.to(weight.device, weight.dtype)
    value = apply_mask(value, mask)
    if semi_structured and decision.pattern != "dense":     # a linear left dense stays dense
        try:
            value = to_semi_structured(value)
        except ValueError as error:
            raise PassError("rewrite", node, f"{decision.weight} cannot be semi-structured: {error}") from error
    _replace_parameter(gm, decision.weight, value)
    return True


def rewrite(gm: torch.fx.GraphModule, config: RewriteConfig = RewriteConfig()) -> PassResult:
    if config.semi_structured:
        require_cuda()                   # one line, before any weight is touched
    modified = False
    for node in list(gm.graph.nodes):
        modified |= apply_decision(gm, node, config.semi_structured)
        if config.remove_observers and node.op == "call_module" and str(node.target).startswith(OBSERVER_PREFIX):
            gm.graph.erase_node(node)
            gm.delete_submodule(str(node.target))
            modified = True
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return PassResult(gm, modified)
