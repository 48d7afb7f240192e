"""What survived pruning: perplexity on a text file, and any extra evaluation (a :class:`Task`)
the caller brings, such as VQA accuracy on a fixture's held-out split
(:class:`tamp_fx.testbeds.vqa.VqaTask`, which the CLI passes)."""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from tamp_fx.calibrate.files import checked_file, pieces
from tamp_fx.errors import TampError

TEXT_FILE, TEXT_HINT = "text file", "pass a UTF-8 plain text file with --text"


class Task(Protocol):
    """An extra evaluation for :func:`evaluate`, run on the loaded model and processor."""

    name: str       # its key in Evaluation.seconds, e.g. "vqa"
    label: str      # what its progress bar counts, e.g. "VQA questions"
    total: int      # how many steps run() advances the bar by
    refusal: str    # after the model's name, when the task is required but does not apply
    absent: str     # why there is no task on a model it does not apply to (a note on "nothing to evaluate")

    def applies(self, processor) -> bool:
        """Whether the model behind ``processor`` can be evaluated on this task."""

    def run(self, net: torch.nn.Module, processor, advance: Callable[..., None]) -> Any:
        """Evaluate ``net``, calling ``advance(k)`` after ``k`` more of ``total`` steps; the result
        becomes :attr:`Evaluation.vqa`."""


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
    path = checked_file(text_file, TEXT_FILE, TEXT_HINT)
    text = "".join(pieces(path, TEXT_FILE))           # UTF-8 text, or one line naming the first byte that is not
    ids = torch.tensor(getattr(tokenizer, "tokenizer", tokenizer)(text, add_special_tokens=False)["input_ids"])  # (T,)
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
    vqa: Any | None                 # the task's result (a VqaResult from the CLI's task), None without one
    perplexity: Perplexity | None
    seconds: dict[str, float]       # task name or "perplexity" -> wall seconds


def evaluate(model: str | Path, *, text: str | Path | None = None, task: Task | None = None,
             task_required: bool = False, seqlen: int = 512, max_windows: int | None = None, bars=None,
             device: str | torch.device | None = None, dtype: str | None = None,
             allow_nonfinite: bool = False) -> Evaluation:
    """Run ``task`` (when given and it applies to the model; refused where it does not and
    ``task_required``) and perplexity on ``text`` (when given). ``bars`` is a
    :class:`tamp_fx.runtime.progress.Bars`. ``device`` and ``dtype`` as for :func:`tamp_fx.plan`
    (:mod:`tamp_fx.runtime.placement`). The model is checked before any work
    (:func:`~tamp_fx.load.validate.load_checked`; NaN or inf weights refused unless ``allow_nonfinite``)."""
    from tamp_fx.load.checkpoint import stored_dtype
    from tamp_fx.load.source import load_config, load_processor, resolve_source
    from tamp_fx.load.validate import load_checked
    from tamp_fx.runtime.placement import check_dtype, resolve_device, resolve_dtype
    from tamp_fx.runtime.progress import Bars

    source = resolve_source(model)
    load_config(source)                                    # a .pt2 or a damaged config: one line, up front
    if text is not None:
        checked_file(text, TEXT_FILE, TEXT_HINT)           # before the model is loaded
    target = resolve_device(device)
    check_dtype(dtype)
    net = load_checked(source, resolve_dtype(dtype, target, stored_dtype(source)),
                       allow_nonfinite=allow_nonfinite).to(target)
    processor = load_processor(source, net.config)
    applies = task is not None and task.applies(processor)
    if task is not None and task_required and not applies:
        raise TampError(f"{model} {task.refusal}")
    if not applies and text is None:
        raise TampError(f"nothing to evaluate on {model}: pass --text FILE for perplexity"
                        + (f" ({task.absent})" if task is not None else ""))
    bars = bars or Bars(False)
    seconds, result, ppl = {}, None, None
    if applies:
        start = time.perf_counter()
        with bars.task(task.label, task.total) as advance:
            result = task.run(net, processor, advance)
        seconds[task.name] = time.perf_counter() - start
    if text is not None:
        start = time.perf_counter()
        with bars.task("perplexity windows", max_windows) as advance:
            ppl = perplexity(net, processor, text, seqlen=seqlen, max_windows=max_windows, advance=advance)
        seconds["perplexity"] = time.perf_counter() - start
    return Evaluation(result, ppl, seconds)
