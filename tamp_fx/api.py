"""The public verbs, as a thin facade over the stages: ``plan`` (calibrate and decide,
:mod:`tamp_fx.pipeline.plan`), ``apply`` (write a pruned model), ``apply_in_memory`` (prune a
loaded model in place, nothing written) and ``convert`` (GGUF to a Hugging Face directory), the
last three :mod:`tamp_fx.write.apply`."""
from tamp_fx.pipeline.plan import plan, plan_inputs
from tamp_fx.write.apply import apply, apply_in_memory, apply_inputs, convert

__all__ = ["plan", "apply", "apply_in_memory", "convert", "plan_inputs", "apply_inputs"]
