"""Fixture 2 through the real transformers LlavaNextProcessor: image tokens per image, the
training batcher's prompts, and the ShareGPT4V-style calibration (needs SmolLM2's tokenizer)."""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from tamp_fx.testbeds.fixture2 import data, scenes
from tamp_fx.testbeds.fixture2 import model as fixture2


@pytest.fixture(scope="module")
def processor(smollm2_present):
    return fixture2.processor()


def _inputs(processor, samples, answers: bool = False):
    def messages(s):
        turns = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": s.question}]}]
        return turns + [{"role": "assistant", "content": [{"type": "text", "text": s.answer}]}] * answers
    texts = [processor.apply_chat_template(messages(s), tokenize=False, add_generation_prompt=not answers)
             for s in samples]
    return processor(text=texts, images=[Image.fromarray(s.image) for s in samples], return_tensors="pt",
                     padding=True)


def test_an_image_is_88_tokens_a_base_view_and_four_tiles(processor):
    samples = scenes.split(2, 6)
    inputs = _inputs(processor, samples)
    image_id = processor.tokenizer.convert_tokens_to_ids(fixture2.IMAGE_TOKEN)
    per_image = (inputs["input_ids"] == image_id).sum(1)
    assert per_image.tolist() == [fixture2.IMAGE_TOKENS] * len(samples)
    assert fixture2.IMAGE_TOKENS >= 80
    assert tuple(inputs["pixel_values"].shape) == (len(samples), 5, 3, 64, 64)   # base view + 2 x 2 tiles
    # the tiles are the image's quarters at full resolution: pixel for pixel, in [-1, 1]
    image = torch.from_numpy(samples[0].image).permute(2, 0, 1).float() / 127.5 - 1    # (3, 128, 128)
    tiles = inputs["pixel_values"][0, 1:]
    for t, (r, c) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        torch.testing.assert_close(tiles[t], image[:, 64 * r:64 * r + 64, 64 * c:64 * c + 64], atol=1e-5, rtol=0)


def test_training_prompts_are_the_processors_prompts(processor):
    from tamp_fx.testbeds.fixture2.train import Batcher
    samples = scenes.split(11, 6, balanced=True)
    batcher = Batcher(processor)
    ids, mask, rows, cols = batcher(samples)
    pixels = batcher.pixel_inputs(samples)
    for i, s in enumerate(samples):
        expected = _inputs(processor, [s], answers=True)
        n = int(mask[i].sum())
        assert ids[i, :n].tolist() == expected["input_ids"][0].tolist()[:n]
        torch.testing.assert_close(pixels["pixel_values"][i], expected["pixel_values"][0])
        # the answer tokens the loss reads are the answer and the end of the turn
        answer = processor.tokenizer(s.answer + "<|im_end|>", add_special_tokens=False)["input_ids"]
        assert ids[i, cols[rows == i]].tolist() == answer


def test_training_conversations_are_the_chat_templates_conversations(processor):
    import numpy as np

    from tamp_fx.testbeds.fixture2.train import Batcher
    rng = np.random.default_rng(5)
    convs = [scenes.conversation(rng, 3) for _ in range(4)]
    ids, mask, rows, cols = Batcher(processor)(convs)
    for i, conv in enumerate(convs):
        messages = []
        for k, s in enumerate(conv):
            question = [{"type": "image"}] * (k == 0) + [{"type": "text", "text": s.question}]
            messages += [{"role": "user", "content": question},
                         {"role": "assistant", "content": [{"type": "text", "text": s.answer}]}]
        text = processor.apply_chat_template(messages, tokenize=False)
        expected = processor(text=[text], images=[Image.fromarray(conv[0].image)], return_tensors="pt")["input_ids"][0]
        n = int(mask[i].sum())
        assert ids[i, :n].tolist() == expected.tolist()[:n] and n >= len(expected) - 1   # all but the final newline
        answers = [t for s in conv for t in processor.tokenizer(s.answer + "<|im_end|>", add_special_tokens=False)["input_ids"]]
        assert ids[i, cols[rows == i]].tolist() == answers


@pytest.fixture(scope="module")
def calibration(processor, tmp_path_factory):
    return data.write_conversations(tmp_path_factory.mktemp("calib") / "c", 128, processor=processor)


def test_calibration_conversations_carry_150_to_300_text_tokens_and_88_image_tokens(processor, calibration):
    from tamp_fx.calibrate.samples import load_calibration
    records = [json.loads(line) for line in calibration.read_text().splitlines()]
    assert len(records) == 128
    for r in records:
        assert data.TEXT_TOKENS[0] <= data.text_tokens(processor, r) <= data.TEXT_TOKENS[1]
        turns = r["conversations"]
        assert len(turns) >= 4 and turns[0]["value"].startswith("<image>")       # description + a question at least
    samples = load_calibration(calibration, processor, nsamples=128)
    image_id = processor.tokenizer.convert_tokens_to_ids(fixture2.IMAGE_TOKEN)
    for s in samples:
        n_image = int((s["input_ids"] == image_id).sum())
        assert n_image == fixture2.IMAGE_TOKENS
        assert data.TEXT_TOKENS[0] <= s["input_ids"].shape[1] - n_image <= data.TEXT_TOKENS[1]


def test_each_calibration_seed_is_its_own_set_of_conversations_and_seed_0_is_the_fixtures(processor, tmp_path):
    def descriptions(path):
        return [json.loads(line)["conversations"][1]["value"] for line in path.read_text().splitlines()]

    sets = [descriptions(data.write_conversations(tmp_path / f"s{seed}", 8, seed=data.calibration_seed(seed),
                                                  processor=processor)) for seed in range(3)]
    assert descriptions(data.write_conversations(tmp_path / "default", 8, processor=processor)) == sets[0]
    for a in range(3):
        for b in range(a + 1, 3):
            assert not set(sets[a]) & set(sets[b])     # other scenes, not the same ones reordered


def test_descriptions_name_every_object_and_the_text():
    numbers = ("one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
               "sixteen").split()                                      # as the cell questions say
    rows = ("first", "second", "third", "fourth")
    for s in scenes.split(4, 40):
        text = data.describe(s.objects, s.text)
        for o in s.objects:
            assert f"In cell {numbers[o.cell]}, in the {o.quadrant} quadrant, there is a {o.size} {o.colour} {o.shape}." in text
        if s.text is not None:
            cells = " and ".join(f"cell {numbers[c]}" for c in s.text.cells)
            assert f'In {cells}, in the {rows[s.text.row]} row, white characters spell "{s.text.string}"' in text


def test_building_without_trained_weights_says_how_to_train(tmp_path):
    from tamp_fx.errors import TampError
    with pytest.raises(TampError, match="python -m tamp_fx.testbeds.fixture2.train"):
        fixture2.build_fixture(tmp_path / "out", weights=tmp_path / "absent.safetensors")
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(fixture2.WEIGHTS.exists(), reason="fixture 2 is trained: the command builds it")
def test_the_cli_says_fixture_2_is_not_trained_yet(tmp_path):
    from tamp_fx.cli.main import app
    r = CliRunner().invoke(app, ["fixture", "--kind", "next", "--out", str(tmp_path / "f")])
    assert r.exit_code == 1 and "fixture2.train" in r.output and "Traceback" not in r.output


def test_a_cell_question_names_its_cell_with_the_token_its_image_tokens_say(processor):
    """The lookup a cell question needs: the question's tokens hold the very token that the
    cell's image tokens are aligned to (one token, the cell's number word), and no other cell's."""
    from tamp_fx.testbeds.fixture.train import word_token_id
    tok = processor.tokenizer
    words = [word_token_id(tok, w) for w in scenes.CELL_WORDS]
    assert len(set(words)) == 16
    for s in scenes.held_out():
        if s.task != "cell":
            continue
        ids = set(tok(s.question, add_special_tokens=False)["input_ids"])
        named = [cell for cell, w in enumerate(words) if w in ids]
        assert len(named) == 1 and scenes.cell_name(named[0]) in s.question, s.question
