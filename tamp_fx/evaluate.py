"""What survived pruning: perplexity of a model on a text file."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from tamp_fx.errors import TampError


@dataclass(frozen=True)
class Perplexity:
    perplexity: float
    windows: int
    seqlen: int
    tokens: int


@torch.no_grad()
def perplexity(model: torch.nn.Module, tokenizer, text_file: str | Path, *, seqlen: int = 512,
               max_windows: int | None = None, advance=None) -> Perplexity:
    """exp(mean next-token loss) over non-overlapping windows of ``seqlen`` tokens, as in the
    Wanda / SparseGPT evaluations (every predicted token of every window counts once)."""
    path = Path(text_file)
    if not path.is_file():
        raise TampError(f"text file {path} does not exist: pass a plain text file with --text")
    ids = torch.tensor(getattr(tokenizer, "tokenizer", tokenizer)(path.read_text(encoding="utf-8"),
                                                                   add_special_tokens=False)["input_ids"])  # (T,)
    n = ids.numel() // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise TampError(f"{path} has {ids.numel()} tokens, fewer than one window of {seqlen}: pass more text or a smaller --seqlen")
    device = next(model.parameters()).device
    total = 0.0
    for w in range(n):
        window = ids[w * seqlen:(w + 1) * seqlen][None].to(device)               # (1, L)
        logits = model(input_ids=window, use_cache=False).logits.float()        # (1, L, V)
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], window[0, 1:], reduction="sum")
        total += float(loss)
        if advance is not None:
            advance()
    predicted = n * (seqlen - 1)
    return Perplexity(math.exp(total / predicted), n, seqlen, predicted)
