"""Fixture 2's rehearsal text: sampled from the base model, seeded, labelled where the model wrote."""
from __future__ import annotations

import math

import pytest
import torch

from tamp_fx.testbeds.fixture2 import rehearsal


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tamp_fx.testbeds.tiny import build_tiny
    out = build_tiny("llama", tmp_path_factory.mktemp("llama"))
    return AutoModelForCausalLM.from_pretrained(out).eval(), AutoTokenizer.from_pretrained(out)


def test_sampling_is_seeded_and_leaves_the_global_random_state_alone(tiny_lm):
    lm, tok = tiny_lm
    state = torch.get_rng_state()
    a = rehearsal.sample(lm, tok, n=8, length=10, held=2, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    b = rehearsal.sample(lm, tok, n=8, length=10, held=2, seed=3)
    c = rehearsal.sample(lm, tok, n=8, length=10, held=2, seed=4)
    assert torch.equal(a.ids, b.ids) and not torch.equal(a.ids, c.ids)


def test_labels_are_the_sampled_tokens_only(tiny_lm):
    lm, tok = tiny_lm
    text = rehearsal.sample(lm, tok, n=8, length=10, held=2, seed=0)
    prompts = {tuple(tok(p, add_special_tokens=False)["input_ids"]) for p in rehearsal.OPENINGS}
    prompts |= {tuple(tok(tok.apply_chat_template([{"role": "user", "content": r}], tokenize=False,
                                                  add_generation_prompt=True), add_special_tokens=False)["input_ids"])
                for r in rehearsal.REQUESTS}
    for ids, mask, labels in zip(text.ids, text.mask, text.labels):
        written = labels != -100
        begin, end = int(written.nonzero()[0]), int(mask.sum())
        assert tuple(ids[:begin].tolist()) in prompts                       # the prompt is not a label
        assert written[begin:end].all() and not written[end:].any()          # the sample is, padding is not
        assert torch.equal(labels[written], ids[written]) and 1 <= end - begin <= 10


def test_loss_is_the_cross_entropy_on_the_sampled_tokens(tiny_lm):
    lm, tok = tiny_lm
    text = rehearsal.sample(lm, tok, n=6, length=8, held=2, seed=1)
    index = [2, 5]
    with torch.no_grad():
        got = float(text.loss(lm, index))
        total, count = 0.0, 0
        for i in index:                                                    # one sequence at a time, unpadded
            n = int(text.mask[i].sum())
            logp = torch.log_softmax(lm(input_ids=text.ids[i:i + 1, :n]).logits[0].float(), -1)   # (n, V)
            for t in range(1, n):
                if text.labels[i, t] != -100:
                    total, count = total - float(logp[t - 1, text.labels[i, t]]), count + 1
    assert got == pytest.approx(total / count, rel=1e-4)
    assert text.base_perplexity == pytest.approx(math.exp(float(text.loss(lm, [0, 1]).detach())), rel=2e-2)  # autocast vs not


def test_the_rehearsal_is_on_by_default_as_for_the_committed_weights_but_not_with_ideal_tokens():
    from tamp_fx.testbeds.fixture2 import train
    assert train.parse([]).keep_language == 1.0
    assert train.parse(["--ideal-tokens", "--out", "x.safetensors"]).keep_language == 0.0
    assert train.parse(["--keep-language", "0"]).keep_language == 0.0
