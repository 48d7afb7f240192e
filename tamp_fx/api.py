"""The public verbs, as a thin facade over the stages: ``plan`` (calibrate and decide,
:mod:`tamp_fx.pipeline.plan`), ``apply`` (write a pruned model), ``apply_in_memory`` (prune a
loaded model in place, nothing written) and ``convert`` (GGUF to a Hugging Face directory), the
last three :mod:`tamp_fx.write.apply`. Dependencies' import-time noise (torchao, torch's pytree)
is silenced before they are imported, as the command line does (:mod:`tamp_fx.runtime.quiet`)."""
from tamp_fx.runtime.quiet import quiet_dependencies

quiet_dependencies()

from tamp_fx.pipeline.plan import plan, plan_inputs  # noqa: E402 - after the silencing
from tamp_fx.write.apply import apply, apply_in_memory, apply_inputs, convert  # noqa: E402

__all__ = ["plan", "apply", "apply_in_memory", "convert", "plan_inputs", "apply_inputs"]
