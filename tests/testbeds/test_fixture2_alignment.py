"""Fixture 2's alignment targets: each image token is pulled to the sum of the words for what
its cell holds and where it is, and the loss and accuracy agree with that (no language model
loaded: a fake tokenizer and random embeddings stand in)."""
from __future__ import annotations

from types import SimpleNamespace

import torch

from tamp_fx.testbeds.fixture2 import scenes
from tamp_fx.testbeds.fixture2.train import Aligner


class _Words:
    """A tokenizer with one id per word."""

    def __init__(self):
        self.ids: dict[str, int] = {}

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [self.ids.setdefault(text.strip(), len(self.ids))]}


def _aligner(dim=576):                  # SmolLM2's width: random words are nearly orthogonal
    torch.manual_seed(0)
    embed = torch.randn(200, dim)
    model = SimpleNamespace(model=SimpleNamespace(language_model=SimpleNamespace(embed_tokens=SimpleNamespace(weight=embed))))
    return Aligner(model, _Words())


def test_labels_are_each_tokens_bag_of_words():
    aligner = _aligner()
    samples = scenes.split(11, 3)
    labels = aligner.labels(samples)                                              # (3, 80, W)
    for b, s in enumerate(samples):
        bags = [bag for part in scenes.describing_words(s) for bag in part]
        for t, bag in enumerate(bags):
            assert {aligner.words[i] for i in labels[b, t].nonzero().flatten().tolist()} == set(bag)


def test_the_sum_of_a_tokens_words_scores_perfectly_and_a_wrong_cell_does_not():
    aligner = _aligner()
    labels = aligner.labels(scenes.split(11, 4))
    ideal = labels @ aligner.embeddings                                           # (4, 80, D)
    assert aligner.accuracy(ideal, labels) == {"val_base_words": 1.0, "val_tile_words": 1.0}
    shifted = labels.roll(1, dims=1) @ aligner.embeddings                          # each token says its neighbour's cell
    assert aligner.loss(ideal, labels) < aligner.loss(shifted, labels)
    assert aligner.accuracy(shifted, labels)["val_base_words"] == 0.0
    # without its cell word a token matches only where chance puts the right cell among
    # its k nearest words (about one token in 16 with random embeddings)
    cell = torch.tensor([aligner.index[w] for w in scenes.CELL_WORDS])
    without = labels.clone()
    without[..., cell] = 0
    assert all(v < 0.2 for v in aligner.accuracy(without @ aligner.embeddings, labels).values())


def test_by_word_recall_names_the_kind_of_word_a_token_misses():
    aligner = _aligner()
    labels = aligner.labels(scenes.split(11, 4))
    ideal = aligner.accuracy(labels @ aligner.embeddings, labels, by_word=True)
    assert {k for k in ideal if k.startswith("val_tile_")} >= {"val_tile_cell", "val_tile_colour", "val_tile_nothing"}
    assert all(v == 1.0 for v in ideal.values())
    cell = torch.tensor([aligner.index[w] for w in scenes.CELL_WORDS])
    without = labels.clone()
    without[..., cell] = 0                       # tokens that say what, not where
    missed = aligner.accuracy(without @ aligner.embeddings, labels, by_word=True)
    assert missed["val_tile_cell"] < 0.2 and missed["val_base_cell"] < 0.2
    assert missed["val_tile_colour"] > 0.9 and missed["val_base_nothing"] > 0.9


def test_character_weight_one_is_the_plain_loss_and_more_weighs_the_text_tokens():
    import torch.nn.functional as F
    aligner = _aligner()
    samples = [s for s in scenes.split(12, 12) if s.text is not None][:3]
    labels = aligner.labels(samples)
    out = torch.randn(labels.shape[0], 80, aligner.embeddings.shape[1])
    want = labels @ aligner.embeddings
    share = labels / labels.sum(-1, keepdim=True)
    plain = F.mse_loss(out, want) / aligner.scale - (share * F.log_softmax(aligner._logits(out), -1)).sum(-1).mean()
    assert torch.isclose(aligner.loss(out, labels), plain, rtol=1e-5)
    # character tokens put on their words cost less than the random others: weighting them more lowers the loss
    chars = labels[..., aligner.characters].amax(-1).bool()                       # (B, 80)
    assert chars.any()
    fixed = torch.where(chars[..., None], want, out)
    assert aligner.loss(fixed, labels, 10.0) < aligner.loss(fixed, labels, 1.0)
