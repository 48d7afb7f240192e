"""The fixture model assembled from the committed weights: loads like any transformers model,
keeps SmolLM2's shipped weights, and answers the held-out split as well as promised."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tamp_fx.testbeds.fixture import model as fixture
from tamp_fx.testbeds.fixture.scenes import split

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def built(tmp_path_factory, smollm2_present):
    out = tmp_path_factory.mktemp("fixture") / "model"
    fixture.build_fixture(out)
    return out


@pytest.fixture(scope="module")
def loaded(built, load_built):
    return load_built(built)


def test_it_is_an_ordinary_transformers_directory(built):
    import transformers
    net = transformers.AutoModelForImageTextToText.from_pretrained(built)
    assert type(net).__name__ == "LlavaForConditionalGeneration"
    assert net.config.image_token_index == 8 and net.config.text_config.vocab_size == 49152
    from tamp_fx.testbeds.vqa import fixture_of
    assert getattr(net.config, fixture.MARKER) == "llava" and fixture_of(built) == "llava"   # eval asks it VQA


def test_smollm2_weights_are_the_shipped_ones_plus_the_merged_lora(loaded, assert_shipped_plus_lora):
    assert_shipped_plus_lora(loaded[0], fixture.WEIGHTS)


def test_training_prompts_are_the_processors_prompts(loaded):
    from tamp_fx.testbeds.fixture.train import Batcher, pixels
    from tamp_fx.testbeds.vqa import question_prompt
    _, processor = loaded
    samples = split(11, 6)
    ids, mask, rows, cols = Batcher(processor)(samples)
    for i, s in enumerate(samples):
        text = processor.apply_chat_template([
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": s.question}]},
            {"role": "assistant", "content": [{"type": "text", "text": s.answer}]}], tokenize=False)
        expected = processor(text=[text], images=[Image.fromarray(s.image)], return_tensors="pt")
        n = int(mask[i].sum())
        assert ids[i, :n].tolist() == expected["input_ids"][0].tolist()[:n]
        assert torch.equal(pixels([s])[0], expected["pixel_values"][0])
        assert text.startswith(question_prompt(processor, s.question))


def test_dense_held_out_accuracy_is_at_least_85_percent(loaded):
    from tamp_fx.testbeds.vqa import vqa_accuracy
    net, processor = loaded
    result = vqa_accuracy(net, processor, 600)
    assert result.accuracy >= 0.85, result.per_task
    assert np.isclose(np.mean(list(result.per_task.values())), result.accuracy)
