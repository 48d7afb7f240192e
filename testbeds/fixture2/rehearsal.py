"""Rehearsal text: what keeps fixture 2's LoRA from forgetting how to write.

Attempt 8's LoRA, trained on one-word answers only, left a language model that no longer models
text: perplexity 30,509 on WikiText-2 (16 windows of 512 tokens) where SmolLM2 alone has about
19, and 2,456 on held-out scene descriptions (docs/quality-v2-attempt8/quality-v2.md). Rehearsal
trains, beside the answers, on text that SmolLM2 itself wrote before any training (sampled once,
seeded): the cross entropy on samples of the base model is the KL divergence from the base model
plus a constant, so it pulls the LoRA back toward the base model's distribution, without a
teacher pass per step and without a data set (nothing is downloaded, and WikiText-2 stays unseen
for the evaluation).

Half of the samples answer a chat request, half continue the opening of a plain sentence, so
that both the chat template and plain text are rehearsed.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tamp_fx.runtime.placement import cpu_autocast

REQUESTS = (
    "Tell me about the history of the bicycle.", "How do plants make their food?",
    "Write a short story about a lighthouse keeper.", "Explain what a prime number is.",
    "What should I pack for a week of hiking?", "Describe a busy market in the morning.",
    "Why is the sky blue?", "Give me three tips for learning a new language.",
    "What is the difference between weather and climate?", "Write a letter to a friend who moved away.",
    "How does a refrigerator keep food cold?", "Summarise the rules of chess.",
    "What happened during the industrial revolution?", "Explain how vaccines work.",
    "Describe your ideal city.", "How do I make bread at home?",
)
OPENINGS = (
    "The river", "In 1850,", "Most people", "The museum", "During the war", "A new study", "The album",
    "When the", "Scientists have", "The village of", "His first", "After the game", "The company",
    "In the early", "The bridge", "According to",
)


@dataclass
class Rehearsal:
    """Sequences sampled from the base language model: ``ids`` (N, T) right-padded, ``labels``
    (N, T) the ids where the model wrote them and -100 elsewhere (prompt, padding); the first
    ``held`` sequences are kept out of training, for :meth:`perplexity`."""

    ids: torch.Tensor
    mask: torch.Tensor
    labels: torch.Tensor
    held: int
    base_perplexity: float = float("nan")      # the base model's on the held sequences

    def loss(self, model, index: list[int] | torch.Tensor) -> torch.Tensor:
        """Mean cross entropy of ``model`` (a causal LM or a VLM: its decoder and head) on the
        sampled tokens of the sequences ``index``."""
        ids, mask, labels = self.ids[index], self.mask[index], self.labels[index]      # (B, T) each
        hidden = model.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state   # (B, T, D)
        written = labels[:, 1:] != -100                                                # (B, T-1): predicts a label
        logits = model.lm_head(hidden[:, :-1][written])                                # (L, V): the head where it counts
        return F.cross_entropy(logits.float(), labels[:, 1:][written])

    def training_indices(self, rng, n: int) -> list[int]:
        return (self.held + rng.choice(len(self.ids) - self.held, size=n, replace=False)).tolist()

    def perplexity(self, model) -> float:
        """``model``'s perplexity on the held sequences (the text it should still model)."""
        with torch.no_grad(), cpu_autocast():
            return float(self.loss(model, list(range(self.held))).exp())


def sample(lm, tokenizer, n: int = 256, length: int = 128, held: int = 16, seed: int = 0) -> Rehearsal:
    """``n`` sequences of up to ``length`` new tokens sampled (temperature 1, no truncation) from
    ``lm``, a causal language model, half answering :data:`REQUESTS` through its chat template, half
    continuing :data:`OPENINGS`; seeded without touching the global random state."""
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": r}], tokenize=False,
                                             add_generation_prompt=True) for r in REQUESTS] + list(OPENINGS)
    per_prompt = -(-n // len(prompts))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows: list[tuple[list[int], int]] = []            # (ids, where the sampled part starts)
    with torch.random.fork_rng(), torch.no_grad(), cpu_autocast():
        torch.manual_seed(seed)
        for prompt in prompts:
            start = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]   # (1, P)
            out = lm.generate(start.expand(per_prompt, -1), attention_mask=torch.ones_like(start).expand(per_prompt, -1),
                              do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=length,
                              pad_token_id=pad)                                                    # (k, P + L)
            for seq in out:
                new = seq[start.shape[1]:].tolist()
                if pad in new:                       # finished early: keep through its end-of-text token
                    new = new[:new.index(pad) + 1]
                rows.append((start[0].tolist() + new, start.shape[1]))
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))[:n]   # mix the prompts
    rows = [rows[i] for i in order]
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((n, width), pad)
    mask = torch.zeros((n, width), dtype=torch.long)
    labels = torch.full((n, width), -100)
    for i, (row, begin) in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
        labels[i, begin:len(row)] = ids[i, begin:len(row)]
    text = Rehearsal(ids, mask, labels, held)
    text.base_perplexity = text.perplexity(lm)
    return text
