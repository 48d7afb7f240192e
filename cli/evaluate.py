"""``tamp-fx eval``: perplexity, and VQA on the fixtures (:mod:`tamp_fx.testbeds.vqa`), of one
model or of a pruned model against its dense baseline."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from tamp_fx.cli.app import (
    DEVICES,
    AllowNonfinite,
    Dtype,
    Quiet,
    Verbose,
    app,
    choices,
    console,
    fail,
    out_console,
    setup,
    user_errors,
)
from tamp_fx.testbeds.vqa import SPLITS

VqaSplit = choices("VqaSplit", SPLITS)
EvalDevice = Annotated[Optional[str], typer.Option(help=f"Where to run the model(s): {DEVICES}.", show_default=False)]
STDOUT = "-"


@app.command(name="eval")
def evaluate(
    model: Annotated[Path, typer.Argument(help="Hugging Face model directory or .gguf file.")],
    text: Annotated[Optional[Path], typer.Option(help="Plain text file for perplexity.")] = None,
    vqa: Annotated[Optional[bool], typer.Option(
        "--vqa/--no-vqa", help="VQA on the fixture's held-out split (default: when MODEL is one of tamp-fx's "
                               "fixtures, as its config.json says; the questions mean nothing on other models).",
        show_default=False)] = None,
    vqa_samples: Annotated[Optional[int], typer.Option(
        min=1, help="Ask the first N held-out questions (default: all of the split; the six tasks take turns).",
        show_default=False)] = None,
    vqa_split: Annotated[Optional[VqaSplit], typer.Option(
        help="Whose held-out split: llava (fixture 1, 600 questions) or next (fixture 2, 1,200 questions). "
             "Default: the fixture's own, the only one it is asked.", show_default=False)] = None,
    seqlen: Annotated[int, typer.Option(min=2, help="Tokens per perplexity window.")] = 512,
    max_windows: Annotated[Optional[int], typer.Option(min=1, help="Evaluate at most this many windows.")] = None,
    baseline: Annotated[Optional[Path], typer.Option(
        help="The dense model MODEL was pruned from: evaluate it too (same questions, same windows) and print "
             "dense, pruned and pruned/dense side by side.")] = None,
    json_file: Annotated[Optional[Path], typer.Option(
        "--json", metavar="FILE", help="Also write the results as JSON to FILE; - prints only the JSON, on stdout.")
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the --json file if it exists.")] = False,
    device: EvalDevice = None,
    dtype: Dtype = None,
    allow_nonfinite: AllowNonfinite = False,
    quiet: Quiet = False,
    verbose: Verbose = False,
) -> None:
    """VQA accuracy of MODEL (per task and overall; tamp-fx's fixtures only) and its perplexity on --text."""
    setup(verbose)

    with user_errors():
        from tamp_fx.evaluate import evaluate as run_eval
        from tamp_fx.runtime.output import check_output
        from tamp_fx.runtime.progress import Bars
        from tamp_fx.runtime.transaction import atomic_file
        to_stdout, inputs = str(json_file) == STDOUT, tuple(p for p in (model, baseline, text) if p is not None)
        if json_file is not None and not to_stdout:
            if str(json_file).startswith("-"):
                fail(f"--json takes a file name, or - for stdout; got {json_file}")
            check_output(json_file, overwrite=overwrite, protect=inputs, file=True, option="--json")     # before any work
        task, skipped = _vqa_task(model, baseline, vqa, vqa_split, vqa_samples)
        if task is None and text is None:
            why = "--no-vqa turned VQA off" if vqa is False else "it is not one of tamp-fx's fixtures, so no VQA"
            fail(f"nothing to evaluate on {model} ({why}): pass --text FILE for perplexity")
        models = {"dense": baseline, "pruned": model} if baseline is not None else {"value": model}
        results = {}
        with Bars(not quiet and not to_stdout) as bars:
            for name, path in models.items():
                results[name] = run_eval(path, text=text, task=task, task_required=task is not None, seqlen=seqlen,
                                         max_windows=max_windows, bars=bars, device=device, dtype=dtype,
                                         allow_nonfinite=allow_nonfinite)
        reports = {name: _report(models[name], text, task, r) for name, r in results.items()}
        report = reports.pop("pruned" if baseline is not None else "value")
        if baseline is not None:
            report.update(baseline=reports["dense"], ratio=_ratios(reports["dense"], report))
        if skipped:
            console.print(skipped, highlight=False)
        if to_stdout:
            out_console.print_json(json.dumps(report))
            return
        out_console.print(_table(report))
        for name, r in results.items():                # a short line each, never folded
            out_console.print(f"wall time{' (' + name + ')' if baseline is not None else ''}: "
                              + ", ".join(f"{k} {v:.1f} s" for k, v in r.seconds.items()), highlight=False, soft_wrap=True)
        if json_file is not None:
            with atomic_file(json_file, overwrite=overwrite, protect=inputs) as tmp:
                tmp.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
            console.print(f"results written to {json_file}", highlight=False)


def _vqa_task(model: Path, baseline: Optional[Path], vqa: Optional[bool], split, samples: Optional[int]):
    """(the VQA to run or None, the line saying why the default skipped it or None): VQA runs on
    tamp-fx's fixtures only, on their own split; the baseline must be the same fixture."""
    from tamp_fx.testbeds.vqa import VqaTask, fixture_of, sample_count
    if vqa is False:
        return None, None
    fixture = fixture_of(model)
    if fixture is None:
        why = f"{model} is not one of tamp-fx's fixtures; its synthetic questions mean nothing on other models"
        if vqa:
            fail(f"--vqa: {why} (`tamp-fx fixture` builds the fixtures): drop --vqa")
        return None, f"VQA skipped: {why}"
    if baseline is not None and fixture_of(baseline) != fixture:
        fail(f"--baseline {baseline} is not the {fixture} fixture like {model}: pass the dense model {model} was "
             "pruned from, or --no-vqa")
    if split is not None and split.value != fixture:
        fail(f"{model} is the {fixture} fixture, so it is asked the {fixture} split: leave out --vqa-split")
    return VqaTask(fixture, sample_count(fixture, samples)), None


def _report(model: Path, text: Optional[Path], task, result) -> dict:
    """The JSON of one model's evaluation (what the table prints, unrounded)."""
    report: dict = {"model": str(model), "seconds": {k: round(v, 2) for k, v in result.seconds.items()}}
    if result.vqa is not None:
        v = result.vqa
        report["vqa"] = {"split": task.split, "accuracy": v.accuracy, "per_task": v.per_task, "samples": v.samples,
                         "questions_per_task": v.questions}
    if result.perplexity is not None:
        p = result.perplexity
        report.update(text=str(text), perplexity=p.perplexity, windows=p.windows, seqlen=p.seqlen)
    return report


def _plural(n: int, what: str) -> str:
    return f"{n:,} {what}{'' if n == 1 else 's'}"


def _rows(report: dict) -> list[tuple[str, float, str]]:
    """(metric, value, what it was measured on) of every number in a :func:`_report`, in table order."""
    rows = []
    if "vqa" in report:
        v = report["vqa"]
        rows += [(f"VQA {task}", acc, _plural(v["questions_per_task"][task], "held-out question"))
                 for task, acc in v["per_task"].items()]
        asked = _plural(v["samples"], "held-out question")
        rows.append(("VQA overall", v["accuracy"], f"{asked} ({v['split']} split)"))
    if "perplexity" in report:
        rows.append(("perplexity", report["perplexity"],
                     f"{report['text']}: {_plural(report['windows'], 'window')} of {report['seqlen']} tokens"))
    return rows


def _ratios(dense: dict, pruned: dict) -> dict[str, Optional[float]]:
    """metric -> pruned / dense (None where dense is 0), for every row of the table."""
    return {metric: p / d if d else None for (metric, d, _), (_, p, _) in zip(_rows(dense), _rows(pruned))}


def _value(metric: str, value: Optional[float], ratio: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if ratio or metric == "perplexity" else f"{value:.1%}"


def _table(report: dict) -> Table:
    """The report as a table: a value per metric, or dense, pruned and pruned/dense with a baseline."""
    dense = report.get("baseline")
    table = Table(title=f"{report['model']}" + (f" (pruned) against {dense['model']} (dense)" if dense else ""))
    table.add_column("metric")
    for col in ("dense", "pruned", "pruned/dense") if dense else ("value",):
        table.add_column(col, justify="right")
    table.add_column("measured on")
    rows = _rows(report)
    for (metric, value, measured), base in zip(rows, _rows(dense) if dense else [None] * len(rows)):
        values = [_value(metric, value)] if base is None else \
            [_value(metric, base[1]), _value(metric, value), _value(metric, report["ratio"][metric], ratio=True)]
        table.add_row(metric, *values, measured)
    return table
