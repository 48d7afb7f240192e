"""ShareGPT4V-style calibration conversations for fixture 2 (``calib.jsonl`` + PNGs).

Each conversation is what a user's calibration set looks like: the image, a request for a
detailed description, a long description of every object (cell, quadrant, size, colour, shape)
and of the text the image shows, then a few question-answer turns about the same image, so a
sample carries 88 image tokens and 150-300 text tokens. Scenes come from their own seed
(:data:`CALIB_SEED`), apart from training (100), held-out (101) and validation (102); the
descriptions of :data:`DESCRIPTION_SEED` are the in-distribution text for perplexity.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from tamp_fx.runtime.transaction import atomic_directory, atomic_file
from tamp_fx.testbeds.fixture2 import scenes

CALIB_SEED, DESCRIPTION_SEED = 103, 104
TEXT_TOKENS = (150, 300)      # text tokens per conversation, the image placeholder not counted
_NUMBERS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight")


def calibration_seed(seed: int) -> int | list[int]:
    """The scene seed of calibration set ``seed``: set 0 is the fixture's own
    (:data:`CALIB_SEED`, what ``tamp-fx fixture --calib-out`` writes); set ``s > 0`` draws its
    scenes from ``[CALIB_SEED, s]``, so that another calibration seed means other conversations,
    not the same ones in another order."""
    return CALIB_SEED if seed == 0 else [CALIB_SEED, seed]


def describe(objects, text: scenes.Text | None) -> str:
    """A long description: every object with its cell, quadrant, size, colour and shape, the
    text and where it is, the counts by colour, and how many cells are empty."""
    n = len(objects)
    parts = [f"The image is a dark, slightly noisy square divided into a four by four grid of cells. "
             f"It shows {_NUMBERS[n]} object{'s' * (n != 1)}{' and a line of text' if text else ''}."]
    for o in sorted(objects, key=lambda o: o.cell):
        parts.append(f"In {scenes.cell_name(o.cell)}, in the {o.quadrant} quadrant, there is a {o.size} "
                     f"{o.colour} {o.shape}.")
    if text is not None:
        where = " and ".join(scenes.cell_name(c) for c in text.cells)
        parts.append(f"In {where}, in the {scenes.ROW_NAMES[text.row]} row, white characters spell \"{text.string}\".")
    counts = [f"{_NUMBERS[sum(o.colour == c for o in objects)]} {c}" for c in scenes.COLOURS]
    parts.append(f"By colour there are {', '.join(counts[:-1])} and {counts[-1]} objects.")
    empty = scenes.GRID * scenes.GRID - n - (len(text.cells) if text else 0)
    parts.append(f"The other {empty} cells are empty.")
    return " ".join(parts)


def text_tokens(processor, record: dict) -> int:
    """Text tokens of a conversation through ``processor``'s chat template (the one image
    placeholder not counted)."""
    from tamp_fx.calibrate.samples import _messages
    prompt = processor.apply_chat_template(_messages(record), tokenize=False)
    return len(processor.tokenizer(prompt, add_special_tokens=False)["input_ids"]) - prompt.count(processor.image_token)


def conversation(rng: np.random.Generator, processor) -> tuple[np.ndarray, dict]:
    """(image, record): a description and as many question-answer turns (of different tasks,
    at least one) as keep the text tokens within :data:`TEXT_TOKENS`, at least the lower bound
    where the six tasks allow it."""
    qa = scenes.conversation(rng, len(scenes.TASKS))
    first = qa[0]
    turns = [{"from": "human", "value": "<image>\nDescribe this image in detail."},
             {"from": "gpt", "value": describe(first.objects, first.text)}]
    record = {"conversations": turns}
    for s in qa:
        turns += [{"from": "human", "value": s.question}, {"from": "gpt", "value": s.answer}]
        n = text_tokens(processor, record)
        if n > TEXT_TOKENS[1]:
            del turns[-2:]
            break
        if n >= TEXT_TOKENS[0] and len(turns) >= 6:   # at least two question-answer turns
            break
    return first.image, record


def write_conversations(out: str | Path, n: int = 128, *, seed: int | list[int] = CALIB_SEED, overwrite: bool = False,
                        processor=None) -> Path:
    """``out/calib.jsonl`` with ``n`` conversations about ``out/images/*.png``; ``processor``
    (fixture 2's, which counts the text tokens) is loaded when not given."""
    from tamp_fx.testbeds.fixture2.model import processor as load_processor

    out = Path(out)
    processor = processor or load_processor()
    rng = np.random.default_rng(seed)
    with atomic_directory(out, overwrite=overwrite) as tmp:
        (tmp / "images").mkdir()
        lines = []
        for i in range(n):
            image, record = conversation(rng, processor)
            name = f"images/{i:05d}.png"
            Image.fromarray(image).save(tmp / name)
            lines.append(json.dumps({"image": name, **record}))
        (tmp / "calib.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out / "calib.jsonl"


def write_descriptions(out: str | Path, n: int = 400, *, seed: int = DESCRIPTION_SEED, overwrite: bool = False) -> Path:
    """``n`` scene descriptions, one paragraph each, as a plain text file for perplexity."""
    rng = np.random.default_rng(seed)
    paragraphs = []
    for _ in range(n):
        s = scenes.conversation(rng, 1)[0]
        paragraphs.append(describe(s.objects, s.text))
    with atomic_file(Path(out), overwrite=overwrite) as tmp:
        tmp.write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
    return Path(out)
