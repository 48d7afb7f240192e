"""``tamp-fx eval``: perplexity, and VQA on the fixtures (:mod:`tamp_fx.testbeds.vqa`)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from tamp_fx.cli.app import Device, Dtype, Quiet, Verbose, app, choices, fail, out_console, setup, user_errors
from tamp_fx.testbeds.vqa import SPLITS

VqaSplit = choices("VqaSplit", SPLITS)


@app.command(name="eval")
def evaluate(
    model: Annotated[Path, typer.Argument(help="Hugging Face model directory or .gguf file.")],
    text: Annotated[Optional[Path], typer.Option(help="Plain text file for perplexity.")] = None,
    vqa: Annotated[Optional[bool], typer.Option("--vqa/--no-vqa", help="VQA on the fixture's held-out split "
                                                "(default: when the model takes images).")] = None,
    vqa_samples: Annotated[int, typer.Option(help="Held-out questions (the six tasks in equal numbers).")] = 600,
    vqa_split: Annotated[VqaSplit, typer.Option(help="Whose held-out split: llava (fixture 1, 600 questions) or "
                                                "next (fixture 2, 1,200 questions).")] = "llava",
    seqlen: Annotated[int, typer.Option(help="Tokens per perplexity window.")] = 512,
    max_windows: Annotated[Optional[int], typer.Option(help="Evaluate at most this many windows.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")] = False,
    device: Device = None,
    dtype: Dtype = None,
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """VQA accuracy of MODEL (per task and overall) and its perplexity on --text."""
    setup(verbose)

    with user_errors():
        from tamp_fx.evaluate import evaluate as run_eval
        from tamp_fx.runtime.progress import Bars
        from tamp_fx.testbeds.vqa import VqaTask
        if vqa_samples < 1:
            fail(f"--vqa-samples must be at least 1, got {vqa_samples}")
        task = None if vqa is False else VqaTask(VqaSplit(vqa_split).value, vqa_samples)  # None: when it takes images
        with Bars(not quiet and not as_json) as bars:
            result = run_eval(model, text=text, task=task, task_required=bool(vqa), seqlen=seqlen,
                              max_windows=max_windows, bars=bars, device=device, dtype=dtype)
        report = _evaluation_json(model, text, result)
        if as_json:
            out_console.print_json(json.dumps(report))
            return
        table = Table(title=f"{model}")
        for col in ("metric", "value", "measured on"):
            table.add_column(col, justify="left" if col != "value" else "right")
        if result.vqa is not None:
            for task, acc in result.vqa.per_task.items():
                table.add_row(f"VQA {task}", f"{acc:.1%}", f"{result.vqa.samples // len(result.vqa.per_task)} held-out questions")
            table.add_row("VQA overall", f"{result.vqa.accuracy:.1%}",
                          f"{result.vqa.samples} held-out questions ({VqaSplit(vqa_split).value} split)")
        if result.perplexity is not None:
            p = result.perplexity
            table.add_row("perplexity", f"{p.perplexity:.3f}",
                          f"{text}: {p.windows} window{'s' if p.windows != 1 else ''} of {p.seqlen} tokens")
        out_console.print(table)
        out_console.print("wall time: " + ", ".join(f"{k} {v:.1f} s" for k, v in result.seconds.items()), highlight=False)


def _evaluation_json(model: Path, text: Optional[Path], result) -> dict:
    report: dict = {"model": str(model), "seconds": {k: round(v, 2) for k, v in result.seconds.items()}}
    if result.vqa is not None:
        report["vqa"] = {"accuracy": result.vqa.accuracy, "per_task": result.vqa.per_task,
                         "samples": result.vqa.samples}
    if result.perplexity is not None:
        p = result.perplexity
        report.update(text=str(text), perplexity=p.perplexity, windows=p.windows, seqlen=p.seqlen)
    return report
