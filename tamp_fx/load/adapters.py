"""Model adapters: where the language decoder of a supported model lives, and what is left alone.

Families are data (a registry keyed on ``config.model_type``), not code paths: the same
lookup (``get_decoder()``, its ModuleList of layers, the config's modality token ids)
serves them all.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from tamp_fx.errors import TampError
from tamp_fx.modality import Modality


@dataclass(frozen=True)
class Family:
    model_type: str
    auto_class: str                       # transformers Auto class used when config.architectures is absent
    modalities: tuple[Modality, ...]      # modalities besides text that its inputs can carry
    has_processor: bool = True            # AutoProcessor (multimodal) or AutoTokenizer (text-only)


_VL = (Modality.IMAGE, Modality.VIDEO)
FAMILIES: dict[str, Family] = {f.model_type: f for f in [
    Family("llava", "AutoModelForImageTextToText", (Modality.IMAGE,)),
    Family("llava_next", "AutoModelForImageTextToText", (Modality.IMAGE,)),
    Family("llava_onevision", "AutoModelForImageTextToText", _VL),
    Family("qwen2_vl", "AutoModelForImageTextToText", _VL),
    Family("qwen2_5_vl", "AutoModelForImageTextToText", _VL),
    Family("qwen2_audio", "Qwen2AudioForConditionalGeneration", (Modality.AUDIO,)),
    Family("llama", "AutoModelForCausalLM", (), has_processor=False),
    Family("qwen2", "AutoModelForCausalLM", (), has_processor=False),
    Family("mistral", "AutoModelForCausalLM", (), has_processor=False),
]}

_TOKEN_ID_KEYS = {
    Modality.IMAGE: ("image_token_id", "image_token_index"),
    Modality.VIDEO: ("video_token_id", "video_token_index"),
    Modality.AUDIO: ("audio_token_id", "audio_token_index"),
}


def family_of(config) -> Family:
    """The supported family of a transformers config, or a one-line error naming those supported."""
    return family_for(getattr(config, "model_type", None))


def family_for(model_type: str | None) -> Family:
    if model_type not in FAMILIES:
        raise TampError(f"unsupported architecture {model_type!r}: tamp-fx supports {', '.join(FAMILIES)}")
    return FAMILIES[model_type]


def modality_token_ids(config) -> dict[Modality, int]:
    """Placeholder token id of every non-text modality the model's family carries."""
    family = family_of(config)
    ids = {}
    for modality in family.modalities:
        for key in _TOKEN_ID_KEYS[modality]:
            value = getattr(config, key, None)
            if isinstance(value, int):
                ids[modality] = value
                break
    return ids


@dataclass(frozen=True)
class DecoderLayout:
    """The language decoder of a loaded model."""

    layers: torch.nn.ModuleList
    prefix: str                            # in-memory name of the layers, e.g. "model.language_model.layers"
    untouched: tuple[str, ...]             # top-level parts left alone (vision tower, projector, lm_head, ...)

    def layer_prefix(self, index: int) -> str:
        return f"{self.prefix}.{index}"


def decoder_layout(model: torch.nn.Module) -> DecoderLayout:
    """Find the decoder layers: the largest ModuleList of the model's ``get_decoder()``."""
    family_of(model.config)
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if decoder is None:
        raise TampError(f"{type(model).__name__} has no get_decoder(): cannot locate its language decoder")
    lists = [m for m in decoder.children() if isinstance(m, torch.nn.ModuleList) and len(m)]
    if not lists:
        raise TampError(f"{type(decoder).__name__} holds no list of decoder layers")
    layers = max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))
    prefix = next(name for name, m in model.named_modules() if m is layers)
    untouched = []
    for name, module in model.named_modules():
        if not name or prefix.startswith(name + ".") or name == prefix or name.startswith(prefix + "."):
            continue
        parent = name.rpartition(".")[0]
        if parent == "" or prefix.startswith(parent + "."):
            untouched.append(name)
    return DecoderLayout(layers, prefix, tuple(untouched))
