"""tamp-fx: token-adaptive pruning of multimodal LLM decoders, written as torch.fx passes.

>>> import tamp_fx
>>> tamp_fx.PlanConfig(method="wanda", sparsity=0.5).method
'wanda'
"""
from tamp_fx.api import apply, convert, plan
from tamp_fx.artifact import LinearPlan, Plan
from tamp_fx.config import PlanConfig
from tamp_fx.errors import TampError

__version__ = "0.1.0"
__all__ = ["plan", "apply", "convert", "Plan", "LinearPlan", "PlanConfig", "TampError", "__version__"]
