"""Commands over the testbeds: ``fixture`` (assemble a trained fixture) and ``demo``."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from tamp_fx.cli.app import (
    Log,
    LogFormat,
    Overwrite,
    Quiet,
    Verbose,
    app,
    choices,
    done,
    next_steps,
    out_console,
    quote,
    setup,
    user_errors,
)
from tamp_fx.testbeds.fixtures import FIXTURES

FixtureKind = choices("FixtureKind", FIXTURES.names())


@app.command()
def fixture(
    out: Annotated[Path, typer.Option(help="Directory to write the fixture model (a transformers directory) to.")],
    calib_out: Annotated[Optional[Path], typer.Option(help="Also write calibration conversations (calib.jsonl + "
                                                      "images/) from the training distribution here.")] = None,
    conversations: Annotated[int, typer.Option(min=1, help="How many conversations --calib-out gets.")] = 128,
    kind: Annotated[FixtureKind, typer.Option(help="llava: fixture 1 (LLaVA, 16 image tokens); next: fixture 2 "
                                                   "(LLaVA-NeXT, 88 image tokens).")] = FixtureKind.llava,
    overwrite: Overwrite = False,
    verbose: Verbose = False,
) -> None:
    """Assemble a multimodal fixture: SmolLM2-135M-Instruct + the committed vision tower, projector and LoRA.

    Fixture 1 is calibrated on question-answer conversations, fixture 2 on ShareGPT4V-style descriptions.
    """
    setup(verbose)

    with user_errors():
        from tamp_fx.runtime.output import check_output
        chosen = FIXTURES[kind.value]
        check_output(out, overwrite=overwrite, protect=(chosen.model.WEIGHTS, *([calib_out] if calib_out else [])))
        if calib_out is not None:
            check_output(calib_out, overwrite=overwrite, protect=(chosen.model.WEIGHTS, out), option="--calib-out")
        start = time.perf_counter()
        chosen.model.build_fixture(out, overwrite=overwrite)
        lines, calib = [f"fixture written to {out} in {time.perf_counter() - start:.1f} s"], "FILE"
        if calib_out is not None:
            path = chosen.data.write_conversations(calib_out, conversations, overwrite=overwrite)
            lines.append(f"{conversations} calibration conversations written to {path}")
            calib = quote(path)
        done(*lines, *next_steps(f"tamp-fx plan {quote(out)} --calib {calib} --out plan/"))


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Directory for the demo's models and plan.")] = Path("demo-out"),
    quiet: Quiet = False,
    verbose: Verbose = False,
    log_format: Log = LogFormat.auto,
) -> None:
    """Prune the multimodal fixture with TAMP at 50%; compare VQA and perplexity before and after."""
    setup(verbose, log_format)

    with user_errors():
        from tamp_fx.testbeds.demo import EVAL_TEXT, run_demo
        r = run_demo(out, progress=not quiet)
        c, d, p = r.config, r.dense, r.pruned
        table = Table(title=f"fixture (SmolLM2-135M-Instruct + trained SigLIP tower), {c.method} at {c.sparsity:.0%}, "
                            f"calibrated on {c.nsamples} conversations")
        for col in ("metric", "dense", "pruned"):
            table.add_column(col, justify="right")
        table.add_row("decoder sparsity", "0.00%", f"{r.sparsity:.2%}")
        for task in d.vqa.per_task:
            table.add_row(f"VQA {task}", f"{d.vqa.per_task[task]:.1%}", f"{p.vqa.per_task[task]:.1%}")
        table.add_row(f"VQA overall ({d.vqa.samples} questions)", f"{d.vqa.accuracy:.1%}", f"{p.vqa.accuracy:.1%}")
        table.add_row(f"perplexity ({d.perplexity.windows} x {d.perplexity.seqlen} tokens)",
                      f"{d.perplexity.perplexity:.2f}", f"{p.perplexity.perplexity:.2f}")
        out_console.print(table)
        e = r.example
        out_console.print(_half_blocks(e.sample.image))
        done(f"{e.image} asks: {e.sample.question}",          # short lines, never folded at 80 columns
             f"  expected: {e.sample.answer}  dense: {e.dense.strip()!r}  pruned: {e.pruned.strip()!r}",
             f"text: {EVAL_TEXT.name} (bundled WikiText-2 excerpt)",
             "wall time: " + ", ".join(f"{k} {v:.0f}s" for k, v in r.seconds.items()))
        done(f"outputs written to {r.workdir}", *next_steps(f"tamp-fx inspect {quote(r.workdir / 'plan')} --html "
                                                              f"{quote(r.workdir / 'plan.html')}"))


def _half_blocks(image, step: int = 2):
    """An RGB image (H, W, 3) as terminal text: one '▀' per two pixel rows, every ``step``-th pixel."""
    from rich.text import Text
    small = image[::step, ::step]
    text = Text()
    for top, bottom in zip(small[0::2], small[1::2]):
        for (r1, g1, b1), (r2, g2, b2) in zip(top, bottom):
            text.append("\u2580", style=f"rgb({r1},{g1},{b1}) on rgb({r2},{g2},{b2})")
        text.append("\n")
    return text
