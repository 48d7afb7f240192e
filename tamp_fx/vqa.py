"""VQA accuracy on the fixture's held-out split: exact match on the normalised short answer.

The held-out split is :func:`tamp_fx.fixture.scenes.split` with seed 1 (training draws from
seed 0, validation during training from seed 2), the six tasks in equal numbers. Answers are
generated greedily (at most 4 new tokens) through the model's own processor and chat template.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from tamp_fx.errors import TampError
from tamp_fx.fixture import scenes
from tamp_fx.processors import takes_images

HELD_OUT_SEED = 1


@dataclass(frozen=True)
class VqaResult:
    accuracy: float                 # overall exact-match accuracy
    per_task: dict[str, float]      # task -> accuracy
    samples: int
    answers: list[str]              # the model's answers, in split order


def held_out(n: int = 600) -> list[scenes.Sample]:
    return scenes.split(HELD_OUT_SEED, n, balanced=True)


def _prompt(processor, question: str) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@torch.no_grad()
def answer(model, processor, samples: list[scenes.Sample], *, batch: int = 32, advance=None) -> list[str]:
    """The model's greedy answer to each sample's question about its image."""
    from PIL import Image

    if not takes_images(processor):
        raise TampError("this model takes no images, so it cannot answer the VQA split: pass --no-vqa")
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"                 # generation continues every row from its end
    answers = []
    for i in range(0, len(samples), batch):
        part = samples[i:i + batch]
        inputs = processor(text=[_prompt(processor, s.question) for s in part],
                           images=[Image.fromarray(s.image) for s in part], return_tensors="pt", padding=True)
        inputs = inputs.to(model.device, dtype=model.dtype)    # floating inputs (pixels) in the model's dtype
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        answers += tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        if advance is not None:
            advance(len(part))
    return answers


def vqa_accuracy(model, processor, n: int = 600, *, advance=None) -> VqaResult:
    samples = held_out(n)
    answers = answer(model, processor, samples, advance=advance)
    hits = [scenes.normalise(a) == scenes.normalise(s.answer) for a, s in zip(answers, samples)]
    per_task = {}
    for task in scenes.TASKS:
        mine = [h for h, s in zip(hits, samples) if s.task == task]
        if mine:
            per_task[task] = sum(mine) / len(mine)
    return VqaResult(sum(hits) / len(hits), per_task, len(samples), answers)
