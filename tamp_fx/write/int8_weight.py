"""Save a pruned Hugging Face model quantized with torchao int8 weight-only (``--quantize int8-weight``).

The output is what transformers' own torchao integration writes and reads back:
``config.json`` carries ``quantization_config`` (``TorchAoConfig``: ``quant_method: torchao``,
``quant_type: {"default": Int8WeightOnlyConfig}``, ``modules_to_not_convert``), and the
safetensors file stores each quantized weight flattened into ``<module>._weight_qdata``
(int8), ``_weight_scale`` and ``_weight_zero_point``, described in the file's metadata. So
``AutoModel*.from_pretrained(out)`` loads it (with torchao installed) as ``Int8Tensor``
weights, safetensors and all; no pickle is involved.

Only the linears the plan pruned (the language decoder's) are quantized; every other module
(vision tower, projector, ``lm_head``) stays in its float dtype, listed in
``modules_to_not_convert`` by the shortest prefixes that hold no pruned linear. Int8
weight-only quantization is symmetric per output row (zero point 0), so a pruned 0.0 stays
exactly 0.0; :func:`save_int8_weight` checks that before writing.
"""
from __future__ import annotations

import logging
from collections.abc import Collection, Mapping
from pathlib import Path

import torch
import transformers

from tamp_fx.errors import TampError, first_line
from tamp_fx.load.source import ModelSource, load_config, model_class
from tamp_fx.write.hf import copy_companions
from tamp_fx.write.quantize import dequantized_weight, require_torchao

log = logging.getLogger(__name__)

#: Files ``save_pretrained`` writes itself; everything else (tokenizer, processor) is copied.
_MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors.index.json")


def untouched_prefixes(linears: Collection[str], quantized: Collection[str]) -> list[str]:
    """The shortest module-name prefixes that cover every linear not in ``quantized`` and
    no linear in it: the ``modules_to_not_convert`` of a TorchAoConfig.

    >>> untouched_prefixes(["v.0.fc", "v.1.fc", "m.layers.0.q", "m.proj", "lm_head"], ["m.layers.0.q"])
    ['lm_head', 'm.proj', 'v']
    """
    quantized = set(quantized)
    ancestors = {".".join(q.split(".")[:i]) for q in quantized for i in range(1, q.count(".") + 2)}
    out = set()
    for name in set(linears) - quantized:
        parts = name.split(".")
        # the highest ancestor of ``name`` that is not an ancestor of a quantized linear
        out.add(next(".".join(parts[:i]) for i in range(1, len(parts) + 1) if ".".join(parts[:i]) not in ancestors))
    return sorted(out)


def save_int8_weight(pruned: Path, out: Path, masks: Mapping[str, torch.Tensor]) -> None:
    """Write the pruned Hugging Face model at ``pruned`` to the (existing, empty) directory
    ``out`` with the linears whose weights ``masks`` names (in-memory parameter name ->
    keep-mask (C_out, C_in)) quantized int8 weight-only, in transformers' torchao format."""
    require_torchao()
    from torchao.quantization import Int8WeightOnlyConfig
    from torchao.utils import TorchAOBaseTensor

    config = load_config(ModelSource(pruned, "hf"))
    cls = model_class(config)
    modules = {name.rpartition(".")[0] for name in masks}
    with torch.device("meta"):
        skeleton = cls._from_config(config)
    linears = [n for n, m in skeleton.named_modules() if isinstance(m, torch.nn.Linear)]
    del skeleton
    if not modules <= set(linears):
        raise TampError(f"the plan prunes {sorted(modules - set(linears))[0]}, which is not an nn.Linear of "
                        f"{cls.__name__}: int8-weight quantizes nn.Linear modules only")
    # set_inductor_config=False: loading must not change torch._inductor's global settings
    quantization = transformers.TorchAoConfig(Int8WeightOnlyConfig(set_inductor_config=False),
                                              modules_to_not_convert=untouched_prefixes(linears, modules))
    try:
        net = cls.from_pretrained(pruned, quantization_config=quantization, dtype="auto", use_safetensors=True)
    except Exception as error:  # noqa: BLE001 - one line for the user, the cause chained
        raise TampError(f"transformers could not quantize {cls.__name__} with torchao int8-weight: "
                        f"{first_line(error)}") from error
    quantized = {n for n, m in net.named_modules()
                 if isinstance(m, torch.nn.Linear) and isinstance(m.weight, TorchAOBaseTensor)}
    if quantized != modules:
        raise TampError(f"int8-weight quantized {len(quantized)} linears, the plan pruned {len(modules)}: "
                        f"first difference {sorted(quantized ^ modules)[0]}")
    for name, mask in masks.items():
        weight = dequantized_weight(net.get_submodule(name.rpartition(".")[0]))     # (C_out, C_in)
        if bool((weight[~mask.to(weight.device)] != 0).any()):
            raise TampError(f"int8-weight quantization made pruned weights of {name} nonzero: please report this")
    net.save_pretrained(out)
    copy_companions(pruned, out, skip={*_MODEL_FILES, *(p.name for p in out.iterdir())})
    log.info("int8-weight: quantized %d linears, kept %d in float", len(modules), len(linears) - len(modules))
