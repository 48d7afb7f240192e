"""Quantization on top of pruning, with torchao (optional extra ``quant``).

Two schemes, both CPU-capable:

* ``"int8-weight"``: torchao ``quantize_`` with ``Int8WeightOnlyConfig`` (symmetric int8
  weights, one scale per output row, float activations) on a model's ``nn.Linear`` modules.
* ``"pt2e-x86"``: PT2E static quantization of an exported graph with torchao's
  ``X86InductorQuantizer`` (int8 per-channel symmetric weights, uint8 per-tensor activations
  calibrated on example inputs); see :func:`quantize_graph_pt2e`.

Both quantize weights symmetrically (zero point 0), so a pruned weight (exactly 0.0) maps to
the integer 0 and dequantizes to exactly 0.0: pruning survives quantization.
:func:`dequantized_weight` returns the float weight a quantized linear effectively uses, to
check that. torchao is imported lazily: without it this module still imports, and only the
functions that need it raise a :class:`~tamp_fx.errors.TampError`.
"""
from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx
from torch import nn

from tamp_fx.errors import TampError, first_line
from tamp_fx.registry import Registry

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class Quantizer:
    """A quantization scheme and the kind of model it quantizes."""

    name: str
    takes: str                     # "model" (Hugging Face / GGUF) or "program" (.pt2)


QUANTIZERS: Registry[Quantizer] = Registry("quantization scheme")
QUANTIZERS.register(Quantizer("int8-weight", "model"))        # torchao int8 weight-only, eager model
QUANTIZERS.register(Quantizer("pt2e-x86", "program"))         # PT2E static int8 (X86InductorQuantizer), graph

_INSTALL_HINT = "pip install --no-deps torchao==0.18.0"


def require_torchao() -> None:
    """Raise a one-line TampError if torchao cannot be imported."""
    try:
        import torchao  # noqa: F401
    except ImportError as error:
        raise TampError(f"quantization needs torchao, which is not installed: {_INSTALL_HINT}") from error


def quantize_model(model: nn.Module, scheme: str, *,
                   modules: Callable[[str, nn.Module], bool] | None = None) -> nn.Module:
    """Quantize the ``nn.Linear`` modules of ``model`` in place with ``scheme``; returns ``model``.

    ``modules(name, module)`` selects which linears (by qualified name) are quantized; by
    default every ``nn.Linear``. Only ``"int8-weight"`` works on an eager model: for
    ``"pt2e-x86"`` (static activation quantization needs a graph and calibration inputs) use
    :func:`quantize_graph_pt2e`. The caller passes its own copy: the weights are replaced.
    """
    if QUANTIZERS[scheme].takes == "program":
        raise TampError("scheme 'pt2e-x86' quantizes an exported graph with example inputs: "
                        "use tamp_fx.write.quantize.quantize_graph_pt2e instead of quantize_model")
    require_torchao()
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    selected: list[str] = []

    def filter_fn(module: nn.Module, name: str) -> bool:  # torchao calls filter_fn(module, fqn)
        keep = isinstance(module, nn.Linear) and (modules is None or modules(name, module))
        if keep:
            selected.append(name)
        return keep

    # set_inductor_config=False: do not change torch._inductor's global settings as a side effect.
    quantize_(model, Int8WeightOnlyConfig(set_inductor_config=False), filter_fn=filter_fn)
    if not selected:
        log.warning("quantize_model(%r): no nn.Linear module was selected; nothing quantized", scheme)
    log.info("quantize_model(%r): quantized %d linear modules", scheme, len(selected))
    return model


def quantize_graph_pt2e(gm_or_module: nn.Module, example_args: tuple,
                        example_kwargs: dict[str, Any] | None = None, *,
                        calibration: Iterable[tuple] = ()) -> torch.fx.GraphModule:
    """PT2E static int8 quantization (``"pt2e-x86"``) of a module or exported graph.

    A ``torch.fx.GraphModule`` is taken to come from ``torch.export.export(...).module()``
    (e.g. :func:`tamp_fx.capture.graph.export_layer`) and is transformed in place: pass a copy. Any
    other module is first exported with ``torch.export.export(..., strict=False)`` (static
    shapes: the graph then serves inputs shaped like the examples). The graph is prepared
    with ``X86InductorQuantizer`` and its default static config (int8 per-channel symmetric
    weights, uint8 per-tensor affine activations), calibrated by one call on the example
    inputs and one on each positional-argument tuple of ``calibration``, and converted. The
    result holds the int8 weights as constants followed by
    ``quantized_decomposed.dequantize_per_channel`` nodes; it runs eagerly in float
    ("reference" quantized graph), and ``torch.compile`` lowers it to int8 kernels.
    """
    require_torchao()
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    kwargs = example_kwargs or {}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if isinstance(gm_or_module, torch.fx.GraphModule):
            gm = gm_or_module
        else:
            try:
                gm = torch.export.export(gm_or_module, tuple(example_args), kwargs, strict=False).module()
            except Exception as error:  # noqa: BLE001 - one line for the user, the cause chained
                raise TampError(f"torch.export could not trace {type(gm_or_module).__name__} for pt2e "
                                f"quantization: {first_line(error)}"
                                ) from error
        quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config())
        prepared = prepare_pt2e(gm, quantizer)
        prepared(*example_args, **kwargs)  # calibration: the observers record activation ranges
        for args in calibration:
            prepared(*args)
        converted = convert_pt2e(prepared)
    n_linear = sum(1 for n in converted.graph.nodes if n.op == "call_function"
                   and n.target == torch.ops.aten.linear.default)
    log.info("quantize_graph_pt2e: converted a graph with %d linear nodes", n_linear)
    return converted


def _fetch_attr(gm: torch.nn.Module, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _evaluate_constant(node: torch.fx.Node) -> torch.Tensor:
    """Value of a node computed from constants only (get_attr and call_function of them)."""
    gm = node.graph.owning_module
    if node.op == "get_attr":
        return _fetch_attr(gm, str(node.target))
    if node.op == "call_function":
        args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), _evaluate_constant)
        return node.target(*args, **kwargs)
    raise TampError(f"weight of this linear depends on a graph input ({node.op} {node.name}), not on constants")


def dequantized_weight(module: nn.Module | torch.fx.Node) -> torch.Tensor:
    """The float weight (C_out, C_in) a (possibly quantized) linear effectively multiplies by.

    * an ``nn.Module`` with a ``weight``: a torchao quantized weight (e.g. the ``Int8Tensor``
      of ``"int8-weight"``) is dequantized; a ``torch`` quantized tensor likewise; a float
      weight is returned as is (detached).
    * an ``aten.linear`` node of a graph from :func:`quantize_graph_pt2e`: its weight input
      (int8 constant -> ``dequantize_per_channel``) is evaluated; an unquantized weight
      (a plain ``get_attr``) is returned as is.
    """
    if isinstance(module, torch.fx.Node):
        node = module
        if not (node.op == "call_function" and node.target == torch.ops.aten.linear.default):
            raise TampError(f"dequantized_weight needs an aten.linear node, got {node.format_node()}")
        weight = node.args[1]
        if not isinstance(weight, torch.fx.Node):
            raise TampError(f"linear node's weight is not a graph value: {node.format_node()}")
        with torch.no_grad():
            return _evaluate_constant(weight).detach()
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise TampError(f"{type(module).__name__} has no weight tensor to dequantize")
    try:
        from torchao.utils import TorchAOBaseTensor
    except ImportError:
        TorchAOBaseTensor = ()  # noqa: N806 - no torchao, so no torchao tensors
    with torch.no_grad():
        if isinstance(weight, TorchAOBaseTensor):
            if not hasattr(weight, "dequantize"):
                raise TampError(f"torchao weight type {type(weight).__name__} has no dequantize()")
            return weight.dequantize()
        if weight.is_quantized:
            return weight.dequantize()
        return weight.detach()


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: ``10 log10(||ref||^2 / ||ref - approx||^2)``,
    computed in float64; ``inf`` when ``approx`` equals ``reference``.

    >>> round(sqnr_db(torch.tensor([3.0, 4.0]), torch.tensor([3.0, 3.95])), 1)
    40.0
    """
    if reference.shape != approx.shape:
        raise ValueError(f"shapes differ: reference {tuple(reference.shape)}, approx {tuple(approx.shape)}")
    ref = reference.detach().double()
    signal = float(ref.pow(2).sum())
    noise = float((ref - approx.detach().double()).pow(2).sum())
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)
