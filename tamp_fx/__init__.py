"""tamp-fx: token-adaptive pruning of multimodal LLM decoders, written as torch.fx passes.

>>> import tamp_fx
>>> tamp_fx.PlanConfig(method="wanda", sparsity=0.5).method
'wanda'

The names below are imported on first use, so that ``tamp_fx.cli`` can take over Ctrl-C
before torch is imported.
"""
import importlib

_EXPORTS = {"plan": "tamp_fx.api", "apply": "tamp_fx.api", "apply_in_memory": "tamp_fx.api", "convert": "tamp_fx.api",
            "Plan": "tamp_fx.artifact.plan", "LinearPlan": "tamp_fx.artifact.plan", "PlanConfig": "tamp_fx.config",
            "TampError": "tamp_fx.errors"}

__version__ = "0.1.0"
__all__ = ["plan", "apply", "apply_in_memory", "convert", "Plan", "LinearPlan", "PlanConfig", "TampError", "__version__"]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'tamp_fx' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
