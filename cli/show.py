"""Commands that show a plan: ``inspect`` (table, figures, HTML) and ``diff``."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from tamp_fx.cli.app import Json, Verbose, app, console, out_console, setup, user_errors


def _shorten(names: list[str]) -> list[str]:
    """Drop a suffix every name shares (``q_proj``, ``up_proj`` -> ``q``, ``up``) so tables fit."""
    suffix = os.path.commonprefix([n[::-1] for n in names])[::-1] if len(names) > 1 else ""
    cut = suffix.find("_") if "_" in suffix else -1
    if cut < 0:
        return names
    suffix = suffix[cut:]
    return [n[: -len(suffix)] for n in names]


@app.command()
def inspect(
    plan_dir: Annotated[Path, typer.Argument(
        metavar="PLAN", help="A directory written by `tamp-fx plan`, or a pruned model (its tamp-fx.json).")],
    plot: Annotated[Optional[Path], typer.Option(help="Also draw the plan's figures (PNG) into this directory "
                                                 "(needs matplotlib).")] = None,
    html: Annotated[Optional[Path], typer.Option(help="Also write one self-contained HTML page to this file.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace --html and figures already in --plot.")] = False,
    as_json: Json = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No table (with --plot / --html).")] = False,
    verbose: Verbose = False,
) -> None:
    """Show a plan: per-layer sparsity of every linear; --plot / --html draw its statistics. Or show how a pruned
    model was made (method, sparsity, structure, calibration, fingerprint, command).

    --plot needs matplotlib: pip install 'tamp-fx\\[plot]'.
    """
    setup(verbose)

    with user_errors():
        from tamp_fx.artifact import report
        from tamp_fx.artifact.plan import MASKS_FILE, PLAN_FILE, TIMING_KEY, Plan, describe_timing
        from tamp_fx.errors import TampError
        from tamp_fx.write.provenance import PROVENANCE_FILE
        if not any((plan_dir / name).exists() for name in (PLAN_FILE, MASKS_FILE)):
            if not (plan_dir / PROVENANCE_FILE).is_file():
                raise TampError(f"{plan_dir} is neither a plan ({PLAN_FILE}, {MASKS_FILE}) nor a model written by "
                                f"`tamp-fx apply` ({PROVENANCE_FILE}): pass a directory that `tamp-fx plan` or "
                                "`tamp-fx apply` wrote")
            if plot is not None or html is not None:
                raise TampError(f"--plot and --html draw a plan, and {plan_dir} is a pruned model: pass the plan "
                                f"directory its {PROVENANCE_FILE} names")
            _show_pruned(plan_dir, as_json)
            return
        data = Plan.load(plan_dir).to_json()          # the whole plan checked against itself (one line if damaged)
        protect = (plan_dir.resolve(),)
        report.check_outputs(plot, html, overwrite=overwrite, protect=protect)   # a refusal is all that is printed
        grid = report.Grid.of(data)
        s = data["summary"]
        rows = {}                                      # layer -> ({projection: sparsity or None}, layer total)
        for layer in grid.layers:
            cells = {p: grid.cells.get((layer, p)) for p in grid.projections}
            sizes = [(lp["shape"][0] * lp["shape"][1], lp["sparsity"]) for lp in cells.values() if lp]
            rows[layer] = ({p: lp and lp["sparsity"] for p, lp in cells.items()},
                           sum(n * sp for n, sp in sizes) / sum(n for n, _ in sizes))
        if as_json:
            out_console.print_json(json.dumps({
                "plan": str(plan_dir), "method": data["method"], "pattern": data["config"].get("pattern"),
                "model": data["model"].get("source"), "sparsity": s["sparsity"], "parameters": s["parameters"],
                "timing": data.get(TIMING_KEY),
                "layers": [{"layer": layer, "sparsity": total,
                            "linears": {p: v for p, v in cells.items() if v is not None}}
                           for layer, (cells, total) in rows.items()]}))
        elif not quiet:
            pattern = f" ({data['config']['pattern']})" if data["config"].get("pattern") else ""
            table = Table(title=f"{data['method']}{pattern} plan for {data['model'].get('source')}: "
                                f"{s['sparsity']:.2%} of {s['parameters']:,} parameters pruned")
            table.add_column("layer", justify="right")
            for p in _shorten(grid.projections):
                table.add_column(p, justify="right")
            table.add_column("layer total", justify="right", style="bold")
            for layer, (cells, total) in rows.items():
                table.add_row(str(layer), *("-" if v is None else f"{v:.1%}" for v in cells.values()), f"{total:.1%}")
            out_console.print(table)
            out_console.print(f"planning time: {describe_timing(data.get(TIMING_KEY))}", highlight=False, soft_wrap=True)
        from tamp_fx.runtime.transaction import Outputs
        with Outputs(overwrite=overwrite, protect=protect) as outputs:    # figures and page, or neither
            written = report.write_figures(data, plot, outputs) if plot is not None else []
            if html is not None:
                report.write_html(data, html, outputs)
        if plot is not None:
            console.print(f"{len(written)} figures ({', '.join(p.stem for p in written)}) -> {plot}", highlight=False)
        if html is not None:
            console.print(f"report -> {html}", highlight=False)


def _show_pruned(directory: Path, as_json: bool) -> None:
    """What the ``tamp-fx.json`` of a pruned model records: one line each, or the JSON."""
    from tamp_fx.write.provenance import describe, read_provenance
    record = read_provenance(directory)
    if as_json:
        out_console.print_json(json.dumps(record))
        return
    out_console.print(f"{directory}: pruned by tamp-fx", markup=False, highlight=False, soft_wrap=True)
    for what, value in describe(record):
        out_console.print(f"  {what:<12} {value}", markup=False, highlight=False, soft_wrap=True)


@app.command()
def diff(
    plan_a: Annotated[Path, typer.Argument(metavar="PLAN_A", help="A directory written by `tamp-fx plan`.")],
    plan_b: Annotated[Path, typer.Argument(metavar="PLAN_B", help="Another plan of the same model.")],
    as_json: Json = False,
    force: Annotated[bool, typer.Option("--force", help="Compare plans of different models (a banner says so).")] = False,
    verbose: Verbose = False,
) -> None:
    """Compare two plans of one model: per linear the sparsity of each and the Jaccard index of their kept weights."""
    setup(verbose)

    with user_errors():
        import tamp_fx
        from tamp_fx.artifact.compare import describe_models, diff_plans, same_model
        a, b = tamp_fx.Plan.load(plan_a), tamp_fx.Plan.load(plan_b)
        result = diff_plans(a, b, force=force)
        same = same_model(a, b)
        if not same:
            console.print(f"[bold red]WARNING (--force): these plans were made for DIFFERENT MODELS:[/] "
                          f"{escape(describe_models(a, b))}; the overlap compares masks of different weights",
                          highlight=False, soft_wrap=True)
        if as_json:
            out_console.print_json(json.dumps({"a": str(plan_a), "b": str(plan_b), "same_model": same,
                                               **result.to_json()}))
            return
        table = Table(title=f"A = {plan_a} ({a.config.method}), B = {plan_b} ({b.config.method}): "
                            f"kept weights overlap {result.jaccard:.1%} (Jaccard)")
        for col in ("layer", "projection", "sparsity A", "sparsity B", "kept overlap (Jaccard)"):
            table.add_column(col, justify="left" if col == "projection" else "right")
        for d in result.linears.values():
            table.add_row(str(d.layer), d.projection, f"{d.sparsity_a:.1%}", f"{d.sparsity_b:.1%}", f"{d.jaccard:.1%}")
        table.add_row("all", "", f"{result.sparsity_a:.2%}", f"{result.sparsity_b:.2%}", f"{result.jaccard:.2%}",
                      style="bold")
        out_console.print(table)
