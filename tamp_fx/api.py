"""The public verbs, as a thin facade over the stages: ``plan`` (calibrate and decide,
:mod:`tamp_fx.pipeline.plan`), ``apply`` (write a pruned model) and ``convert`` (GGUF to a
Hugging Face directory), both :mod:`tamp_fx.write.apply`."""
from tamp_fx.pipeline.plan import plan, plan_inputs
from tamp_fx.write.apply import apply, apply_inputs, convert

__all__ = ["plan", "apply", "convert", "plan_inputs", "apply_inputs"]
