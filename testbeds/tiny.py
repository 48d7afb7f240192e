"""Tiny random-weight multimodal (and text-only) models with processor files, built offline.

``build_tiny(family, out_dir)`` writes, in a few seconds and without any download:

* the model (``save_pretrained``: ``config.json`` with ``architectures`` + safetensors);
* its processor (for ``llama``: its tokenizer) with a simple chat template;
* ``calib.jsonl``: ``n_samples`` LLaVA-style conversations whose media (PNG images under
  ``images/`` or 16 kHz mono WAV files under ``audio/``) are drawn procedurally from ``seed``.

The tokenizer is a small byte-level BPE trained on :data:`_CORPUS` with the family's special
tokens added, so every family's config token ids (``image_token_id`` ...) match the tokenizer.
Video: the video processors of this transformers release need torchvision, which this project
does not depend on, so ``calib.jsonl`` has no video; :func:`write_mixed_calib` writes image,
video (frame images) and text samples for the families that take video. LLaVA-OneVision,
Qwen2-VL and Qwen2.5-VL processors are built without a video processor, but their
``processor_config.json`` carries a matching ``video_processor`` entry and their chat templates
take ``<video>``: with torchvision installed ``AutoProcessor`` loads them (video included);
without it ``AutoProcessor`` raises ImportError and :func:`tamp_fx.load.processors.load_processor`
rebuilds the processor, images only.

Command line: ``python -m tamp_fx.testbeds.tiny FAMILY OUT_DIR``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import wave
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tamp_fx.load.processors import load_processor, without_video_processor  # noqa: F401 - load_processor re-exported for tests

log = logging.getLogger(__name__)

FAMILIES: tuple[str, ...] = (
    "llava",
    "llava_next",
    "llava_onevision",
    "qwen2_vl",
    "qwen2_5_vl",
    "qwen2_audio",
    "llama",
)


def slow_except(values, *kept):
    """Parameters for a test that runs on ``kept`` by default and on the rest of ``values`` only
    with ``-m slow``: the default suite stays under 15 minutes on two cores, CI runs both."""
    import pytest
    return [v if v in kept else pytest.param(v, marks=pytest.mark.slow) for v in values]

# Text placeholders of calib.jsonl: where the sample's image / audio goes in the human turn.
IMAGE_PLACEHOLDER = "<image>"
AUDIO_PLACEHOLDER = "<audio>"

SAMPLING_RATE = 16_000
AUDIO_SECONDS = 1.0

# Tiny text decoder shared by every family.
_TEXT = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
)
_VOCAB_SIZE = 512  # BPE target size, special tokens included (256 of it is the byte alphabet)
_GRID_PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64]]  # llava_next / llava_onevision anyres

_CORPUS = """
The quick brown fox jumps over the lazy dog. A small red square sits on a blue background.
What colour is the square? The square is red. The circle is green and the line is yellow.
Where is the square? It is in the top left corner of the image. The bottom right corner is empty.
Describe the image. The picture shows a bright shape on a dark field. There is one object.
How many shapes are there? There are two shapes: a square and a circle. They do not touch.
What is this sound? This is a short tone. The tone is high. The tone is low. It lasts one second.
Is the sound loud or quiet? The sound is quiet and steady. It does not change its pitch.
The weather today is warm and sunny, with a light wind from the west and a few white clouds.
A man walks his dog along the river every morning before he goes to work in the city.
She reads a book in the garden while the children play with a ball near the old tree.
Numbers: one two three four five six seven eight nine ten eleven twelve zero hundred.
What is two plus three? Two plus three is five. What is four times two? It is eight.
Colours: red green blue yellow black white orange purple pink brown grey cyan magenta.
Answer the question in one word. Answer with a short sentence. Please explain your answer.
The model looks at the picture, listens to the audio and reads the text before it answers.
Language models predict the next word from the words that came before. They learn patterns
from large amounts of text, and they can answer questions, write stories and translate.
The cat sleeps on the warm window sill. The bird sings in the morning. The sun sets at night.
We went to the market to buy apples, bread, cheese, milk and eggs for the weekend.
He opened the door, looked outside, and saw that the street was covered in fresh snow.
Left right up down inside outside above below near far big small long short old new.
Thank you. You are welcome. Hello, how are you? I am fine, thank you. Good night.
The train leaves the station at nine and arrives in the capital three hours later.
Music is made of notes; a note has a pitch, a length and a loudness. Silence is also music.
A square has four equal sides. A circle has no corners. A triangle has three sides.
The user asks a question and the assistant gives a helpful, honest and short answer.
"""

_COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 180, 60),
    "blue": (40, 60, 220),
    "yellow": (230, 210, 30),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
_NUMBER_WORDS = "zero one two three four five six seven eight nine ten eleven twelve".split()


@dataclass(frozen=True)
class _Family:
    """How to build one family: its special tokens, chat style and media."""

    arch: str
    special_tokens: tuple[str, ...]
    chat_style: str  # "plain" (USER:/ASSISTANT:) or "chatml"
    media: str | None  # "image", "audio" or None
    media_text: str  # what the processor expects where calib.jsonl has <image>/<audio>
    image_hw: tuple[int, int] = (0, 0)
    video_text: str | None = None  # what the processor expects for <video> (families that take video)


_PLAIN = ("<s>", "</s>", "<pad>")
_CHATML = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
_QWEN_VISION = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")

_FAMILIES: dict[str, _Family] = {
    "llava": _Family(
        "LlavaForConditionalGeneration", _PLAIN + ("<image>",), "plain", "image", "<image>", (32, 32)
    ),
    "llava_next": _Family(
        "LlavaNextForConditionalGeneration", _PLAIN + ("<image>",), "plain", "image", "<image>", (32, 64)
    ),
    "llava_onevision": _Family(
        "LlavaOnevisionForConditionalGeneration",
        _CHATML + ("<image>", "<video>"),
        "chatml",
        "image",
        "<image>",
        (32, 64),
        "<video>",
    ),
    "qwen2_vl": _Family(
        "Qwen2VLForConditionalGeneration",
        _CHATML + _QWEN_VISION,
        "chatml",
        "image",
        "<|vision_start|><|image_pad|><|vision_end|>",
        (56, 84),
        "<|vision_start|><|video_pad|><|vision_end|>",
    ),
    "qwen2_5_vl": _Family(
        "Qwen2_5_VLForConditionalGeneration",
        _CHATML + _QWEN_VISION,
        "chatml",
        "image",
        "<|vision_start|><|image_pad|><|vision_end|>",
        (56, 84),
        "<|vision_start|><|video_pad|><|vision_end|>",
    ),
    "qwen2_audio": _Family(
        "Qwen2AudioForConditionalGeneration",
        _CHATML + ("<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>"),
        "chatml",
        "audio",
        "<|audio_bos|><|AUDIO|><|audio_eos|>",
    ),
    "llama": _Family("LlamaForCausalLM", _PLAIN, "plain", None, ""),
}


def family_spec(family: str) -> _Family:
    """Return the build spec of ``family``; ``ValueError`` naming the valid families if unknown."""
    if family not in _FAMILIES:
        raise ValueError(f"unknown family {family!r}; valid families: {', '.join(FAMILIES)}")
    return _FAMILIES[family]


def expand_placeholders(family: str, text: str) -> str:
    """Replace calib.jsonl's ``<image>``/``<audio>`` in ``text`` with the processor's placeholder.

    >>> expand_placeholders("qwen2_vl", "<image>\\nWhat colour?")
    '<|vision_start|><|image_pad|><|vision_end|>\\nWhat colour?'
    """
    spec = family_spec(family)
    if spec.media == "image":
        return text.replace(IMAGE_PLACEHOLDER, spec.media_text)
    if spec.media == "audio":
        return text.replace(AUDIO_PLACEHOLDER, spec.media_text)
    return text


# ----------------------------------------------------------------------------- tokenizer


def _build_tokenizer(spec: _Family):
    """Train a byte-level BPE on :data:`_CORPUS` and wrap it in ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_VOCAB_SIZE,
        special_tokens=list(spec.special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.split("\n"), trainer=trainer)
    if spec.chat_style == "plain":
        bos, eos, pad = "<s>", "</s>", "<pad>"
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    else:
        bos, eos, pad = None, "<|im_end|>", "<|endoftext|>"
    extra = [t for t in spec.special_tokens if t not in {bos, eos, pad}]
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        additional_special_tokens=extra,
        chat_template=_chat_template(spec),
        model_max_length=_TEXT["max_position_embeddings"],
    )


def _chat_template(spec: _Family) -> str:
    """A small Jinja chat template: string or list content, image/audio parts as placeholders."""
    if spec.chat_style == "chatml":
        start, end, gen = (
            "'<|im_start|>' + message['role'] + '\\n'",
            "'<|im_end|>\\n'",
            "'<|im_start|>assistant\\n'",
        )
    else:
        start, end, gen = "message['role'].upper() + ': '", "'\\n'", "'ASSISTANT:'"
    media = ""
    if spec.media is not None:
        media = (
            f"{{%- elif part['type'] == '{spec.media}' -%}}{{{{ {json.dumps(spec.media_text + chr(10))} }}}}"
        )
    if spec.video_text is not None:
        media += f"{{%- elif part['type'] == 'video' -%}}{{{{ {json.dumps(spec.video_text + chr(10))} }}}}"
    return (
        "{%- for message in messages -%}"
        f"{{{{ {start} }}}}"
        "{%- if message['content'] is string -%}{{ message['content'] }}"
        "{%- else -%}{%- for part in message['content'] -%}"
        "{%- if part['type'] == 'text' -%}{{ part['text'] }}"
        f"{media}"
        "{%- endif -%}{%- endfor -%}{%- endif -%}"
        f"{{{{ {end} }}}}"
        "{%- endfor -%}"
        f"{{%- if add_generation_prompt -%}}{{{{ {gen} }}}}{{%- endif -%}}"
    )


def _text_ids(tokenizer) -> dict[str, int | None]:
    """bos/eos/pad ids and the vocabulary size for the text config."""
    return dict(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


# ----------------------------------------------------------------------------- configs


def _llama_text(tokenizer) -> dict:
    """Tiny Llama text config kwargs."""
    return dict(model_type="llama", **_TEXT, **_text_ids(tokenizer))


def _qwen2_text(tokenizer) -> dict:
    """Tiny Qwen2 text config kwargs."""
    return dict(model_type="qwen2", **_TEXT, **_text_ids(tokenizer))


def _clip_vision(image_size: int = 32, patch_size: int = 8) -> dict:
    """Tiny CLIP vision tower: (image_size / patch_size)^2 patches + CLS."""
    return dict(
        model_type="clip_vision_model",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=32,
    )


def _config_llava(tokenizer):
    """LLaVA-1.5 style: CLIP 32 px / patch 8 (16 tokens after dropping CLS) + Llama."""
    from transformers import LlavaConfig

    return LlavaConfig(
        vision_config=_clip_vision(),
        text_config=_llama_text(tokenizer),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=16,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )


def _config_llava_next(tokenizer):
    """LLaVA-NeXT: the LLaVA towers plus anyres tiling over :data:`_GRID_PINPOINTS`."""
    from transformers import LlavaNextConfig

    return LlavaNextConfig(
        vision_config=_clip_vision(),
        text_config=_llama_text(tokenizer),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=16,
        image_grid_pinpoints=_GRID_PINPOINTS,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )


def _config_llava_onevision(tokenizer):
    """LLaVA-OneVision: SigLIP 32 px / patch 8 (no CLS), anyres tiling, Qwen2."""
    from transformers import LlavaOnevisionConfig

    vision = dict(_clip_vision(), model_type="siglip_vision_model", vision_use_head=False)
    del vision["projection_dim"]
    return LlavaOnevisionConfig(
        vision_config=vision,
        text_config=_qwen2_text(tokenizer),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=_GRID_PINPOINTS,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        vision_aspect_ratio="anyres_max_9",
    )


def _qwen_vl_ids(tokenizer) -> dict:
    """Image/video/vision-start/end ids shared by the Qwen-VL configs."""
    ids = tokenizer.convert_tokens_to_ids
    return dict(
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )


# head_dim 16 -> 8 rotary frequencies split over (t, h, w)
_MROPE = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
_QWEN_PATCH = 7  # 56x84 px -> 8x12 patches -> 4x6 = 24 tokens after the 2x2 merge


def _config_qwen2_vl(tokenizer):
    """Qwen2-VL: patch-7 ViT with 2x2 merge and M-RoPE text decoder."""
    from transformers import Qwen2VLConfig

    text = dict(_TEXT, **_text_ids(tokenizer), rope_parameters=dict(_MROPE))
    vision = dict(
        depth=2,
        embed_dim=32,
        hidden_size=_TEXT["hidden_size"],
        mlp_ratio=2,
        num_heads=2,
        patch_size=_QWEN_PATCH,
        spatial_merge_size=2,
        temporal_patch_size=2,
    )
    return Qwen2VLConfig(text_config=text, vision_config=vision, **_qwen_vl_ids(tokenizer))


def _config_qwen2_5_vl(tokenizer):
    """Qwen2.5-VL: like Qwen2-VL with windowed attention in block 0, full in block 1."""
    from transformers import Qwen2_5_VLConfig

    text = dict(_TEXT, **_text_ids(tokenizer), rope_parameters=dict(_MROPE))
    vision = dict(
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        out_hidden_size=_TEXT["hidden_size"],
        patch_size=_QWEN_PATCH,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=2 * 2 * _QWEN_PATCH,  # 2x2 merged tokens per attention window
        fullatt_block_indexes=[1],
    )
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **_qwen_vl_ids(tokenizer))


_N_MELS = 32
_AUDIO_CHUNK_SECONDS = 2  # feature extractor pads every clip to 2 s = 200 mel frames


def _config_qwen2_audio(tokenizer):
    """Qwen2-Audio: 2-layer Whisper-style encoder over 32 mel bins, 2 s windows."""
    from transformers import Qwen2AudioConfig

    audio = dict(
        model_type="qwen2_audio_encoder",
        num_mel_bins=_N_MELS,
        encoder_layers=2,
        encoder_attention_heads=2,
        encoder_ffn_dim=64,
        d_model=32,
        max_source_positions=_AUDIO_CHUNK_SECONDS * 50,  # 100 frames/s, halved by conv2
    )
    return Qwen2AudioConfig(
        audio_config=audio,
        text_config=_qwen2_text(tokenizer),
        audio_token_index=tokenizer.convert_tokens_to_ids("<|AUDIO|>"),
    )


def _config_llama(tokenizer):
    """Text-only Llama."""
    from transformers import LlamaConfig

    kwargs = _llama_text(tokenizer)
    del kwargs["model_type"]
    return LlamaConfig(**kwargs)


_CONFIG_BUILDERS: dict[str, Callable] = {
    "llava": _config_llava,
    "llava_next": _config_llava_next,
    "llava_onevision": _config_llava_onevision,
    "qwen2_vl": _config_qwen2_vl,
    "qwen2_5_vl": _config_qwen2_5_vl,
    "qwen2_audio": _config_qwen2_audio,
    "llama": _config_llama,
}


# ----------------------------------------------------------------------------- processors


def _clip_image_processor():
    """CLIP-style PIL image processor producing 32x32 px crops."""
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    return LlavaImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})


def _processor_llava(tokenizer, config):
    """LlavaProcessor with a PIL CLIP image processor."""
    from transformers import LlavaProcessor

    return LlavaProcessor(
        image_processor=_clip_image_processor(),
        tokenizer=tokenizer,
        patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=1,  # CLIP's CLS
        chat_template=tokenizer.chat_template,
    )


def _processor_llava_next(tokenizer, config):
    """LlavaNextProcessor with the PIL anyres image processor."""
    from transformers import LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": 32},
        crop_size={"height": 32, "width": 32},
        image_grid_pinpoints=_GRID_PINPOINTS,
    )
    return LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=1,
        chat_template=tokenizer.chat_template,
    )


def _processor_llava_onevision(tokenizer, config):
    """LlavaOnevisionProcessor (no video processor) with the PIL image processor."""
    from transformers import LlavaOnevisionProcessor
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": 32, "width": 32},
        image_grid_pinpoints=_GRID_PINPOINTS,
    )
    side = config.vision_config.image_size // config.vision_config.patch_size
    return without_video_processor(LlavaOnevisionProcessor)(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=None,
        num_image_tokens=side * side,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        vision_aspect_ratio=config.vision_aspect_ratio,
        chat_template=tokenizer.chat_template,
    )


def _qwen_image_processor():
    """Qwen2-VL PIL image processor; 56x84 px images are kept as they are."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(
        size={"shortest_edge": 28 * 28, "longest_edge": 112 * 112},
        patch_size=_QWEN_PATCH,
        merge_size=2,
        temporal_patch_size=2,
    )


def _processor_qwen2_vl(tokenizer, config):
    """Qwen2VLProcessor (no video processor) with the PIL image processor."""
    from transformers import Qwen2VLProcessor

    return without_video_processor(Qwen2VLProcessor)(
        image_processor=_qwen_image_processor(),
        tokenizer=tokenizer,
        video_processor=None,
        chat_template=tokenizer.chat_template,
    )


def _processor_qwen2_5_vl(tokenizer, config):
    """Qwen2_5_VLProcessor (no video processor) with the PIL image processor."""
    from transformers import Qwen2_5_VLProcessor

    return without_video_processor(Qwen2_5_VLProcessor)(
        image_processor=_qwen_image_processor(),
        tokenizer=tokenizer,
        video_processor=None,
        chat_template=tokenizer.chat_template,
    )


def _processor_qwen2_audio(tokenizer, config):
    """Qwen2AudioProcessor with a 32-mel, 2 s Whisper feature extractor."""
    from transformers import Qwen2AudioProcessor, WhisperFeatureExtractor

    feature_extractor = WhisperFeatureExtractor(
        feature_size=_N_MELS,
        sampling_rate=SAMPLING_RATE,
        hop_length=160,
        chunk_length=_AUDIO_CHUNK_SECONDS,
        n_fft=400,
    )
    return Qwen2AudioProcessor(
        feature_extractor=feature_extractor,
        tokenizer=tokenizer,
        chat_template=tokenizer.chat_template,
    )


_PROCESSOR_BUILDERS: dict[str, Callable] = {
    "llava": _processor_llava,
    "llava_next": _processor_llava_next,
    "llava_onevision": _processor_llava_onevision,
    "qwen2_vl": _processor_qwen2_vl,
    "qwen2_5_vl": _processor_qwen2_5_vl,
    "qwen2_audio": _processor_qwen2_audio,
    "llama": lambda tokenizer, config: tokenizer,
}


def _video_processor_config(family: str, processor) -> dict | None:
    """The video processor config a torchvision install would load (matching the image side)."""
    if family not in ("qwen2_vl", "qwen2_5_vl", "llava_onevision"):
        return None
    image = processor.image_processor
    common = {"image_mean": list(image.image_mean), "image_std": list(image.image_std)}
    if family != "llava_onevision":
        return dict(
            common,
            video_processor_type="Qwen2VLVideoProcessor",
            patch_size=_QWEN_PATCH,
            merge_size=2,
            temporal_patch_size=2,
            size={"shortest_edge": 28 * 28, "longest_edge": 4 * 112 * 112},
        )
    return dict(common, video_processor_type="LlavaOnevisionVideoProcessor", size={"height": 32, "width": 32})


def _save_processor(family: str, processor, out: Path) -> None:
    """``save_pretrained`` the processor, adding the video processor config where the family has one."""
    processor.save_pretrained(out)
    video = _video_processor_config(family, processor)
    if video is not None:
        path = out / "processor_config.json"
        saved = json.loads(path.read_text(encoding="utf-8"))
        saved["video_processor"] = video
        path.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------- calibration data


def _draw_image(rng: np.random.Generator, hw: tuple[int, int]) -> tuple[np.ndarray, str, str]:
    """A ``hw`` RGB image: one coloured square on a plain background; returns (pixels, colour, corner)."""
    names = list(_COLOURS)
    fg, bg = rng.choice(len(names), size=2, replace=False)
    height, width = hw
    side = max(4, min(height, width) // 2)
    top = int(rng.integers(0, height - side + 1))
    left = int(rng.integers(0, width - side + 1))
    pixels = np.empty((height, width, 3), dtype=np.uint8)
    pixels[:] = _COLOURS[names[bg]]
    pixels[top : top + side, left : left + side] = _COLOURS[names[fg]]
    noise = rng.integers(-8, 9, size=pixels.shape)
    pixels = np.clip(pixels.astype(np.int16) + noise, 0, 255).astype(np.uint8)
    vertical = "top" if top + side / 2 < height / 2 else "bottom"
    horizontal = "left" if left + side / 2 < width / 2 else "right"
    return pixels, names[fg], f"{vertical} {horizontal}"


def _image_turns(colour: str, corner: str, k: int) -> tuple[str, str]:
    """Question/answer pair ``k`` (cycled) about a drawn square."""
    turns = [
        ("What colour is the square?", colour),
        ("Where is the square?", f"It is near the {corner} corner."),
        ("Describe the image.", f"A {colour} square on a plain background."),
    ]
    return turns[k % len(turns)]


def _write_wav(path: Path, samples: np.ndarray) -> None:
    """Write float samples in [-1, 1] as 16-bit mono PCM at :data:`SAMPLING_RATE`."""
    pcm = (np.clip(samples, -1.0, 1.0) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as handle:
        handle.setnchannels(1)
        handle.setsampwidth(2)
        handle.setframerate(SAMPLING_RATE)
        handle.writeframes(pcm.tobytes())


def read_wav(path: str | Path) -> np.ndarray:
    """Read a 16-bit mono WAV written by this module as float32 samples in [-1, 1]."""
    with wave.open(str(path), "rb") as handle:
        frames = handle.readframes(handle.getnframes())
    return np.frombuffer(frames, dtype="<i2").astype(np.float32) / 32768.0


def _tone(rng: np.random.Generator, high: bool) -> np.ndarray:
    """A seeded 1 s sine tone (high: 1-3 kHz, low: 150-500 Hz) with a little noise."""
    freq = float(rng.uniform(1000.0, 3000.0) if high else rng.uniform(150.0, 500.0))
    t = np.arange(int(SAMPLING_RATE * AUDIO_SECONDS)) / SAMPLING_RATE
    return 0.5 * np.sin(2 * np.pi * freq * t) + 0.01 * rng.standard_normal(t.shape)


def _conversation(question: str, answer: str) -> list[dict[str, str]]:
    """One human/gpt exchange in LLaVA conversation format."""
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def _image_sample(out_dir: Path, rng: np.random.Generator, spec: _Family, k: int) -> dict:
    """Draw image ``k``, save it under images/ and return its calib record."""
    from PIL import Image

    pixels, colour, corner = _draw_image(rng, spec.image_hw)
    rel = f"images/{k}.png"
    Image.fromarray(pixels).save(out_dir / rel)
    question, answer = _image_turns(colour, corner, k)
    return {"image": rel, "conversations": _conversation(f"{IMAGE_PLACEHOLDER}\n{question}", answer)}


def _audio_sample(out_dir: Path, rng: np.random.Generator, spec: _Family, k: int) -> dict:
    """Synthesise tone ``k``, save it under audio/ and return its calib record."""
    pitch = "high" if k % 4 in (0, 3) else "low"
    samples = _tone(rng, pitch == "high")
    rel = f"audio/{k}.wav"
    _write_wav(out_dir / rel, samples)
    question, answer = [
        ("What is this sound?", f"A steady {pitch} tone."),
        ("Is the tone high or low?", pitch),
    ][k % 2]
    return {"audio": rel, "conversations": _conversation(f"{AUDIO_PLACEHOLDER}\n{question}", answer)}


def _text_sample(out_dir: Path, rng: np.random.Generator, spec: _Family, k: int) -> dict:
    """A text-only arithmetic exchange."""
    a, b = (int(x) for x in rng.integers(0, 7, size=2))
    question = f"What is {_NUMBER_WORDS[a]} plus {_NUMBER_WORDS[b]}?"
    answer = f"{_NUMBER_WORDS[a].capitalize()} plus {_NUMBER_WORDS[b]} is {_NUMBER_WORDS[a + b]}."
    return {"conversations": _conversation(question, answer)}


def _write_calib(out_dir: Path, spec: _Family, seed: int, n_samples: int) -> Path:
    """Write ``calib.jsonl`` and its media files; return the jsonl path."""
    make = {"image": _image_sample, "audio": _audio_sample, None: _text_sample}[spec.media]
    if spec.media == "image":
        (out_dir / "images").mkdir()
    elif spec.media == "audio":
        (out_dir / "audio").mkdir()
    rng = np.random.default_rng(seed)
    path = out_dir / "calib.jsonl"
    with path.open("w", encoding="utf-8") as handle:
        for k in range(n_samples):
            handle.write(json.dumps(make(out_dir, rng, spec, k)) + "\n")
    return path


def write_mixed_calib(out_dir: str | Path, family: str, *, seed: int = 0, n_frames: int = 4) -> Path:
    """Write ``calib.jsonl`` into ``out_dir`` for a tiny model of a family that takes video: an
    image sample, a video sample (``n_frames`` frame images of a square moving across the
    picture, under ``videos/``) and a text-only sample, LLaVA-Video style (``"video": [frames]``
    with ``<video>`` in the human turn). Planning on it needs torchvision (video processors)."""
    from PIL import Image

    spec = family_spec(family)
    if spec.video_text is None:
        raise ValueError(f"tiny {family} takes no video")
    out = Path(out_dir)
    rng = np.random.default_rng(seed)
    frames_dir = out / "videos" / "0"
    frames_dir.mkdir(parents=True, exist_ok=True)
    (out / "images").mkdir(exist_ok=True)
    pixels, colour, _ = _draw_image(rng, spec.image_hw)
    frames = []
    for t in range(n_frames):
        rel = f"videos/0/{t}.png"
        Image.fromarray(np.roll(pixels, shift=t * 4, axis=1)).save(out / rel)   # (H, W, 3)
        frames.append(rel)
    records = [
        _image_sample(out, rng, spec, 0),
        {"video": frames, "conversations": _conversation("<video>\nWhat moves in the video?", f"A {colour} square.")},
        _text_sample(out, rng, spec, 2),
    ]
    path = out / "calib.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- build


def build_tiny(family: str, out_dir: str | Path, *, seed: int = 0, n_samples: int = 4) -> Path:
    """Build a tiny random ``family`` model, its processor and calib.jsonl into ``out_dir``.

    ``out_dir`` is created; it must not exist or be empty. Deterministic given ``seed``.
    Returns ``out_dir`` as a ``Path``.
    """
    import transformers

    spec = family_spec(family)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"output directory {out} exists and is not empty")
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = _build_tokenizer(spec)
    config = _CONFIG_BUILDERS[family](tokenizer)
    config.architectures = [spec.arch]
    torch.manual_seed(seed)
    model = getattr(transformers, spec.arch)(config).eval()
    model.save_pretrained(out)
    _save_processor(family, _PROCESSOR_BUILDERS[family](tokenizer, config), out)
    _write_calib(out, spec, seed, n_samples)
    log.info("built tiny %s (%d parameters) in %s", family, sum(p.numel() for p in model.parameters()), out)
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m tamp_fx.testbeds.tiny FAMILY OUT_DIR``; exit 2 on a bad family or non-empty dir."""
    parser = argparse.ArgumentParser(
        prog="python -m tamp_fx.testbeds.tiny", description=__doc__.split("\n")[0]
    )
    parser.add_argument("family", metavar="FAMILY", help=f"one of: {', '.join(FAMILIES)}")
    parser.add_argument("out_dir", metavar="OUT_DIR", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-samples", type=int, default=4)
    args = parser.parse_args(argv)
    if args.family not in FAMILIES:
        print(
            f"error: unknown family {args.family!r}; valid families: {', '.join(FAMILIES)}", file=sys.stderr
        )
        return 2
    if args.out_dir.exists() and (not args.out_dir.is_dir() or any(args.out_dir.iterdir())):
        print(f"error: output directory {args.out_dir} exists and is not empty", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    build_tiny(args.family, args.out_dir, seed=args.seed, n_samples=args.n_samples)
    print(args.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
