"""What survived pruning: perplexity on a text file and VQA accuracy on the fixture's held-out split."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from tamp_fx.errors import TampError
from tamp_fx.processors import takes_images

if TYPE_CHECKING:
    from tamp_fx.vqa import VqaResult


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


@dataclass(frozen=True)
class Evaluation:
    vqa: VqaResult | None
    perplexity: Perplexity | None
    seconds: dict[str, float]


def evaluate(model: str | Path, *, text: str | Path | None = None, vqa: bool | None = None, vqa_samples: int = 600,
             seqlen: int = 512, max_windows: int | None = None, bars=None, device: str | torch.device | None = None,
             dtype: str | None = None) -> Evaluation:
    """VQA accuracy on the fixture's held-out split (``vqa``: None = when the model takes images)
    and perplexity on ``text`` (when given). ``bars`` is a :class:`tamp_fx.progress.Bars`.
    ``device`` and ``dtype`` as for :func:`tamp_fx.plan` (:mod:`tamp_fx.placement`)."""
    from tamp_fx.model_io import load_model, load_processor, resolve_source, stored_dtype
    from tamp_fx.placement import check_dtype, resolve_device, resolve_dtype
    from tamp_fx.progress import Bars
    from tamp_fx.vqa import vqa_accuracy

    source = resolve_source(model)
    target = resolve_device(device)
    check_dtype(dtype)
    net = load_model(source, dtype=resolve_dtype(dtype, target, stored_dtype(source))).to(target)
    processor = load_processor(source, net.config)
    if vqa is None:
        vqa = takes_images(processor)
    if vqa and not takes_images(processor):
        raise TampError(f"{model} takes no images, so it cannot answer the VQA split: pass --no-vqa")
    if not vqa and text is None:
        raise TampError(f"nothing to evaluate on {model}: pass --text FILE for perplexity"
                        + ("" if takes_images(processor) else " (the model takes no images, so there is no VQA)"))
    bars = bars or Bars(False)
    seconds, vqa_result, ppl = {}, None, None
    if vqa:
        start = time.perf_counter()
        with bars.task("VQA questions", vqa_samples) as advance:
            vqa_result = vqa_accuracy(net, processor, vqa_samples, advance=advance)
        seconds["vqa"] = time.perf_counter() - start
    if text is not None:
        start = time.perf_counter()
        with bars.task("perplexity windows", max_windows) as advance:
            ppl = perplexity(net, processor, text, seqlen=seqlen, max_windows=max_windows, advance=advance)
        seconds["perplexity"] = time.perf_counter() - start
    return Evaluation(vqa_result, ppl, seconds)
