"""``tamp-fx export``: the language decoder of a Hugging Face model as an exported program,
with calibration inputs for it, so that a model goes to the ``.pt2`` workflow in one command.

The program is the decoder from its input embeddings to the logits:
``program(inputs_embeds)`` -> ``(1, N, V)``, or ``program(inputs_embeds, position_ids)`` for a
family whose multimodal model passes position ids to its decoder (Qwen2-VL's 3D rope
positions). Image and audio tokens are already embedded: the calibration inputs are what the
full multimodal model hands its decoder on every calibration sample (captured, not
recomputed), with each token's modality (``sample.{i}.labels``) and next-token target
(``sample.{i}.targets``: the token id on text tokens, -100 elsewhere, for ECoFLaP's loss).
The sequence dimension is dynamic. Parameter names are the decoder's own under ``model.``
(``model.layers.0.self_attn.q_proj.weight``) and ``lm_head.``.
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.export import Dim

from tamp_fx.allocate.ecoflap import lm_targets
from tamp_fx.calibrate.program import ProgramSample, save_program_calibration
from tamp_fx.calibrate.samples import calibration_inputs, load_calibration
from tamp_fx.capture.record import recording, run
from tamp_fx.errors import TampError, first_line
from tamp_fx.load.adapters import modality_token_ids
from tamp_fx.load.source import load_processor, resolve_source
from tamp_fx.load.validate import load_checked
from tamp_fx.modality import modality_labels
from tamp_fx.runtime.output import check_output
from tamp_fx.runtime.progress import Bars
from tamp_fx.runtime.transaction import Outputs
from tamp_fx.write.program import save_program

log = logging.getLogger(__name__)


class LanguageDecoder(torch.nn.Module):
    """The exported module: decoder layers and final norm (``model``) and the LM head."""

    def __init__(self, decoder: torch.nn.Module, lm_head: torch.nn.Module) -> None:
        super().__init__()
        self.model = decoder
        self.lm_head = lm_head

    def forward(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.model(inputs_embeds=inputs_embeds, position_ids=position_ids, use_cache=False).last_hidden_state
        return self.lm_head(hidden)                                       # (1, N, V)


@torch.no_grad()
def decoder_inputs(net: torch.nn.Module, samples: list[dict[str, torch.Tensor]], progress=None) -> list[tuple]:
    """What the full model hands its language decoder on every sample: (inputs_embeds, position_ids | None),
    recorded by :func:`~tamp_fx.capture.record.recording` (the forward stops there)."""
    decoder = net.get_decoder()
    embed = decoder.get_input_embeddings()
    name = next(n for n, m in net.named_modules() if m is decoder)
    captured = []
    with recording(net, [name], stop=True) as calls:
        for sample in samples:
            calls.clear()
            run(net, **sample, use_cache=False)
            args, kwargs = calls[0]
            embeds = kwargs.get("inputs_embeds")
            if embeds is None:
                embeds = embed(kwargs.get("input_ids", args[0] if args else None))
            captured.append((embeds.detach(), kwargs.get("position_ids")))
            if progress is not None:
                progress()
    return captured


@dataclass(frozen=True)
class Exported:
    program: Path
    calibration: Path
    samples: int


def export_decoder(model: str | Path, calib: str | Path, out: str | Path, calib_out: str | Path, *,
                   nsamples: int = 128, seqlen: int = 512, seed: int = 0, overwrite: bool = False,
                   progress: bool = False, allow_nonfinite: bool = False) -> Exported:
    """Write the language decoder of ``model`` to the ``.pt2`` file ``out`` and its calibration
    inputs, drawn from ``calib`` as ``tamp-fx plan`` draws them, to ``calib_out`` (module docstring).
    The model is checked as it loads (:func:`~tamp_fx.load.validate.load_checked`): NaN or inf in
    its weights is refused unless ``allow_nonfinite``."""
    source = resolve_source(model)
    out, calib_out = Path(out), Path(calib_out)
    if source.kind == "pt2":
        raise TampError(f"{source.path} is already an exported program: export takes a Hugging Face directory or .gguf")
    if out.suffix != ".pt2":
        raise TampError(f"the exported program is written to a .pt2 file, got --out {out}: pass e.g. --out model.pt2")
    if calib_out.suffix != ".safetensors":
        raise TampError(f"calibration inputs are written to a .safetensors file, got --calib-out {calib_out}: "
                        "pass e.g. --calib-out inputs.safetensors")
    if out.expanduser().absolute() == calib_out.expanduser().absolute():
        raise TampError("--out and --calib-out are the same file: choose two paths")
    protect = (source.path, *calibration_inputs(calib))   # the calibration file checked before the model loads
    for path, option in ((out, "--out"), (calib_out, "--calib-out")):     # refuse before the work, not after
        check_output(path, overwrite=overwrite, protect=protect, file=True, option=option)
    net = load_checked(source, allow_nonfinite=allow_nonfinite)
    processor = load_processor(source, net.config)
    token_ids = modality_token_ids(net.config)
    samples = load_calibration(calib, processor, nsamples=nsamples, seqlen=seqlen, seed=seed)
    with Bars(progress) as bars:
        with bars.task("capture decoder inputs", len(samples)) as advance:
            inputs = decoder_inputs(net, samples, advance)
    with_positions = inputs[0][1] is not None
    program_samples = [ProgramSample((embeds, positions) if with_positions else (embeds,),
                                     modality_labels(sample["input_ids"][0], token_ids),
                                     lm_targets(sample, token_ids)[0])
                       for sample, (embeds, positions) in zip(samples, inputs)]
    module = LanguageDecoder(net.get_decoder(), net.get_output_embeddings()).eval()
    args = program_samples[0].args
    dynamic = ({1: Dim.AUTO}, {args[1].dim() - 1: Dim.AUTO}) if with_positions else ({1: Dim.AUTO},)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            ep = torch.export.export(module, args, dynamic_shapes=dynamic, strict=False)
        except Exception as error:  # noqa: BLE001
            raise TampError(f"torch.export could not export the language decoder of {source.path}: "
                            f"{first_line(error)}") from error
    with Outputs(overwrite=overwrite, protect=protect) as outputs:      # both or neither
        save_program(ep, outputs.file(out))
        save_program_calibration(outputs.file(calib_out), program_samples)
    return Exported(out, calib_out, len(program_samples))
