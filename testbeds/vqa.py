"""VQA accuracy on a fixture's held-out split: exact match on the normalised short answer.

Fixture 1's held-out split ("llava") is :func:`tamp_fx.testbeds.fixture.scenes.split` with seed 1
(training draws from seed 0, validation during training from seed 2); fixture 2's ("next") is
:func:`tamp_fx.testbeds.fixture2.scenes.held_out` (seed 101); both have the six tasks in equal numbers.
Answers are generated greedily (at most 4 new tokens, 8 for fixture 2's strings) through the
model's own processor and chat template. :class:`VqaTask` is this evaluation as a
:class:`tamp_fx.evaluate.Task`.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from tamp_fx.errors import TampError
from tamp_fx.load.processors import takes_images
from tamp_fx.testbeds.fixture import scenes
from tamp_fx.testbeds.fixture.model import MARKER
from tamp_fx.testbeds.fixture2 import scenes as scenes2

HELD_OUT_SEED, HELD_OUT_N = 1, 600


@dataclass(frozen=True)
class VqaResult:
    accuracy: float                 # overall exact-match accuracy
    per_task: dict[str, float]      # task -> accuracy
    samples: int
    answers: list[str]              # the model's answers, in split order
    questions: dict[str, int]       # task -> how many of the samples asked it


def held_out(n: int = HELD_OUT_N) -> list[scenes.Sample]:
    return scenes.split(HELD_OUT_SEED, n, balanced=True)


def question_prompt(processor, question: str) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@torch.no_grad()
def answer(model, processor, samples: list[scenes.Sample], *, batch: int = 32, advance=None,
           max_new_tokens: int = 4) -> list[str]:
    """The model's greedy answer to each sample's question about its image."""
    from PIL import Image

    if not takes_images(processor):
        raise TampError("this model takes no images, so it cannot answer the VQA split: pass --no-vqa")
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"                 # generation continues every row from its end
    answers = []
    for i in range(0, len(samples), batch):
        part = samples[i:i + batch]
        inputs = processor(text=[question_prompt(processor, s.question) for s in part],
                           images=[Image.fromarray(s.image) for s in part], return_tensors="pt", padding=True)
        inputs = inputs.to(model.device, dtype=model.dtype)    # floating inputs (pixels) in the model's dtype
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        answers += tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        if advance is not None:
            advance(len(part))
    return answers


@dataclass(frozen=True)
class Split:
    questions: Callable[[int], list]    # n -> the first n held-out questions
    size: int                           # how many held-out questions it has
    max_new_tokens: int                 # the most new tokens an answer needs


#: split name (the fixture's name, as its config.json's :data:`MARKER` says) -> its held-out
#: questions: "llava" is fixture 1's (seed 1, 600 questions), "next" fixture 2's (seed 101, 1,200)
SPLITS = {"llava": Split(held_out, HELD_OUT_N, 4), "next": Split(scenes2.held_out, scenes2.HELD_OUT_N, 8)}


def fixture_of(model: str | Path) -> str | None:
    """Which of tamp-fx's fixtures ``model`` is (its split's name), as its config.json's
    :data:`MARKER` says (written by ``build_fixture``, kept by ``apply``); None for any other model."""
    from tamp_fx.load.source import resolve_source

    source = resolve_source(model)
    if source.kind != "hf":
        return None
    try:
        name = json.loads((source.path / "config.json").read_text(encoding="utf-8")).get(MARKER)
    except (OSError, ValueError, AttributeError):    # unreadable or not a JSON object: loading will say so
        return None
    return name if isinstance(name, str) and name in SPLITS else None


def sample_count(split: str, samples: int | None = None) -> int:
    """How many of ``split``'s held-out questions to ask: ``samples``, or all of them when None;
    a number outside 1..size is refused in one line."""
    size = SPLITS[split].size
    if samples is None:
        return size
    if samples < 1:
        raise TampError(f"--vqa-samples must be at least 1, got {samples}")
    if samples > size:
        raise TampError(f"--vqa-samples {samples:,} is more than the {split} split has ({size:,} held-out questions): "
                        f"pass at most {size:,}, or leave it out to ask them all")
    return samples


def vqa_accuracy(model, processor, n: int | None = None, *, split: str = "llava", advance=None) -> VqaResult:
    """Accuracy on the first ``n`` questions (default: all) of the held-out ``split`` (:data:`SPLITS`)."""
    chosen = SPLITS[split]
    samples = chosen.questions(sample_count(split, n))
    answers = answer(model, processor, samples, advance=advance, max_new_tokens=chosen.max_new_tokens)
    hits = [scenes.normalise(a) == scenes.normalise(s.answer) for a, s in zip(answers, samples)]
    per_task, questions = {}, {}
    for task in dict.fromkeys(s.task for s in samples):
        mine = [h for h, s in zip(hits, samples) if s.task == task]
        per_task[task], questions[task] = sum(mine) / len(mine), len(mine)
    return VqaResult(sum(hits) / len(hits), per_task, len(samples), answers, questions)


@dataclass(frozen=True)
class VqaTask:
    """VQA accuracy on the first ``samples`` questions (default: all) of the held-out ``split`` as a
    :class:`tamp_fx.evaluate.Task`: it applies to models whose processor takes images (only
    the fixture whose split it is gives a number that means something: :func:`fixture_of`)."""
    split: str = "llava"
    samples: int | None = None
    name = "vqa"
    label = "VQA questions"
    refusal = "takes no images, so it cannot answer the VQA split: pass --no-vqa"
    absent = "the model takes no images, so there is no VQA"

    @property
    def total(self) -> int:
        return sample_count(self.split, self.samples)

    def applies(self, processor) -> bool:
        return takes_images(processor)

    def run(self, net, processor, advance) -> VqaResult:
        return vqa_accuracy(net, processor, self.samples, split=self.split, advance=advance)
