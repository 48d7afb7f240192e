"""VQA accuracy on a fixture's held-out split: exact match on the normalised short answer.

Fixture 1's held-out split ("llava") is :func:`tamp_fx.testbeds.fixture.scenes.split` with seed 1
(training draws from seed 0, validation during training from seed 2); fixture 2's ("next") is
:func:`tamp_fx.testbeds.fixture2.scenes.held_out` (seed 101); both have the six tasks in equal numbers.
Answers are generated greedily (at most 4 new tokens, 8 for fixture 2's strings) through the
model's own processor and chat template. :class:`VqaTask` is this evaluation as a
:class:`tamp_fx.evaluate.Task`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from tamp_fx.errors import TampError
from tamp_fx.load.processors import takes_images
from tamp_fx.testbeds.fixture import scenes

HELD_OUT_SEED = 1


@dataclass(frozen=True)
class VqaResult:
    accuracy: float                 # overall exact-match accuracy
    per_task: dict[str, float]      # task -> accuracy
    samples: int
    answers: list[str]              # the model's answers, in split order


def held_out(n: int = 600) -> list[scenes.Sample]:
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


def _held_out_next(n: int) -> list:
    from tamp_fx.testbeds.fixture2 import scenes as scenes2
    return scenes2.split(scenes2.HELD_OUT_SEED, n, balanced=True)


#: split name -> (the first n held-out questions, the most new tokens an answer needs):
#: "llava" is fixture 1's (seed 1, 600 questions), "next" fixture 2's (seed 101, 1,200)
SPLITS = {"llava": (held_out, 4), "next": (_held_out_next, 8)}


def vqa_accuracy(model, processor, n: int = 600, *, split: str = "llava", advance=None) -> VqaResult:
    """Accuracy on the first ``n`` questions of the held-out ``split`` (:data:`SPLITS`)."""
    questions, max_new_tokens = SPLITS[split]
    samples = questions(n)
    answers = answer(model, processor, samples, advance=advance, max_new_tokens=max_new_tokens)
    hits = [scenes.normalise(a) == scenes.normalise(s.answer) for a, s in zip(answers, samples)]
    per_task = {}
    for task in dict.fromkeys(s.task for s in samples):
        mine = [h for h, s in zip(hits, samples) if s.task == task]
        if mine:
            per_task[task] = sum(mine) / len(mine)
    return VqaResult(sum(hits) / len(hits), per_task, len(samples), answers)


@dataclass(frozen=True)
class VqaTask:
    """VQA accuracy on the first ``samples`` questions of the held-out ``split`` as a
    :class:`tamp_fx.evaluate.Task`: it applies to models whose processor takes images."""
    split: str = "llava"
    samples: int = 600
    name = "vqa"
    label = "VQA questions"
    refusal = "takes no images, so it cannot answer the VQA split: pass --no-vqa"
    absent = "the model takes no images, so there is no VQA"

    @property
    def total(self) -> int:
        return self.samples

    def applies(self, processor) -> bool:
        return takes_images(processor)

    def run(self, net, processor, advance) -> VqaResult:
        return vqa_accuracy(net, processor, self.samples, split=self.split, advance=advance)
