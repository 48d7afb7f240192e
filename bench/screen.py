"""Benchmark v2's screen: many methods at one sparsity and one calibration seed, to pick the few
worth the full grid (``bench/quality_v2.py``).

Each method is planned with `tamp-fx plan` (128 conversations, calibration seed 0, 60% by
default) and evaluated in this process, on the first 600 of fixture 2's 1,200 held-out questions
(``scenes.held_out(600)`` is the first 600 of ``held_out(1200)``: one random stream, drawn in
order), the dense model once on the same questions and CPU. Perplexities only with
``--perplexities``. Rel. and its paired bootstrap interval as the grid computes them. Rows go to
``WORKDIR/screen.jsonl`` as they come, so an interrupted screen resumes (a fresh clone from
``docs/quality-v2-screen.json``); the report is ``quality-v2-screen.md`` and ``.json`` in ``--docs``:
the methods sorted by Rel., with per-task accuracy, plan and evaluation seconds, and the total
wall and CPU time. Run it alone:

    python bench/quality_v2.py --screen --dtype bfloat16 --workdir bench-out/quality-v2
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from quality import Results  # noqa: E402
from quality_v2_runs import begin_runs, cpu_of, hits_of, plan_options, rel_with_interval  # noqa: E402

#: the methods screened by default (names as :func:`quality_v2_runs.plan_options` reads them)
SCREEN = ("wanda", "sparsegpt", "das", "tamp", "wanda+atv", "wanda+balanced", "das+atv", "das+balanced",
          "sparsegpt+atv", "sparsegpt+balanced", "das+sparsegpt", "das+sparsegpt+atv", "das+sparsegpt+balanced")
QUESTIONS = 600
REPORT = "quality-v2-screen"


def run_screen(args) -> None:
    """Screen ``args.methods`` (default :data:`SCREEN`) at ``args.sparsity`` on calibration set
    ``args.seed``, skipping what the workdir's ``screen.jsonl`` has, then write the report."""
    methods, args.vqa_samples = args.methods or list(SCREEN), args.vqa_samples or QUESTIONS
    for m in methods:
        plan_options(m)                               # every name checked before the first plan
    state = Results(args.workdir, args.docs / f"{REPORT}.json", name="screen")
    settings = {"conversations": args.conversations, "vqa_samples": args.vqa_samples, "max_windows": args.max_windows,
                "dtype": args.dtype, "calibration": "a set of conversations per seed", "sparsity": args.sparsity,
                "seed": args.seed, "perplexities": args.perplexities}
    if not args.report_only:
        fixture, record = begin_runs(args, state, settings, args.perplexities)
        for method in args.from_grid or ():
            if not any(r["method"] == method for r in state.rows):
                record(from_grid(args.docs / "quality-v2.json", method, settings, state.rows))
        for method in methods:
            if not any(r["method"] == method for r in state.rows):
                record(fixture.run(method, args.sparsity, args.seed, args.perplexities))
    rows = state.rows
    meta = state.meta() | {"note": args.note, **(rows[0].get("settings", settings) if rows else settings)}
    write_screen(rows, args.docs, meta)
    print(f"wrote {args.docs}/{REPORT}.md and .json")


def from_grid(grid: Path, method: str, settings: dict, rows: list[dict]) -> dict:
    """The screen's row of ``method`` taken from the grid's row of the same sparsity, seed, CPU and
    settings: its plan is the one the screen would make (the same command), so its answers to the
    screen's questions (the first ones of each task: ``held_out(600)`` is a prefix of ``held_out(1200)``)
    are the grid's, bit for bit; the plan seconds are the grid's, measured in its run."""
    dense = next(r for r in rows if r["method"] == "dense")
    match = [r for r in json.loads(grid.read_text())["rows"] if r["method"] == method
             and r["target"] == settings["sparsity"] and r["seed"] == settings["seed"] and cpu_of(r) == cpu_of(dense)
             and all(r["settings"][k] == settings[k] for k in ("conversations", "dtype", "weights"))]
    if not match:
        sys.exit(f"{grid} has no row of {method} at {settings['sparsity']:.0%}, seed {settings['seed']}, on "
                 f"{cpu_of(dense)} with these settings: screen it instead")
    row = match[0]
    hits = {t: h[:len(dense["hits"][t])] for t, h in row["hits"].items()}
    answered = sum(len(h) for h in hits.values())
    return {k: row[k] for k in ("method", "target", "seed", "sparsity", "plan_seconds", "plan_stats", "options")
            if k in row} | {"options": plan_options(method), "hits": hits, "vqa": sum(h.count("1") for h in hits.values()) / answered,
                            "eval_seconds": {}, "from_grid": True}


def screened(rows: list[dict]) -> tuple[dict[str, dict], list[dict]]:
    """The dense rows by CPU, and the pruned rows with Rel. and its interval (each paired with the
    dense row of its CPU), sorted by Rel., best first (an undefined Rel. last)."""
    rng = np.random.default_rng(0)
    denses = {cpu_of(r): r for r in rows if r["method"] == "dense"}
    dense = next(iter(denses.values()))
    pruned = []
    for r in rows:
        if r["method"] != "dense":
            rel, lo, hi = rel_with_interval(r, denses.get(cpu_of(r), dense), rng)
            pruned.append(r | {"rel": rel, "rel_lo": lo, "rel_hi": hi})
    pruned.sort(key=lambda r: (math.isnan(r["rel"]), -r["rel"] if not math.isnan(r["rel"]) else 0.0))
    return denses, pruned


def write_screen(rows: list[dict], docs: Path, meta: dict) -> None:
    denses, pruned = screened(rows)
    tasks = list(next(iter(denses.values()))["hits"])
    ppl = [k for k in ("ppl_desc", "ppl_wiki") if any(k in r for r in rows)]

    def cells(r: dict) -> str:
        accs = [f"{h.mean():.1%}" for h in hits_of(r).values()]
        rel = f"{r['rel']:.3f} [{r['rel_lo']:.3f}, {r['rel_hi']:.3f}]" if "rel" in r else "1.000"
        plan = "-" if r.get("plan_seconds") is None else f"{r['plan_seconds']:.0f}"
        return " | ".join([rel, f"{r['vqa']:.1%}", *accs, *(f"{r[k]:.2f}" if k in r else "-" for k in ppl), plan,
                           f"{sum(r['eval_seconds'].values()):.0f}" if r["eval_seconds"] else "-"])

    def options(r: dict) -> str:
        return "`" + " ".join(r.get("options", [])) + "`" if r.get("options") else "-"

    plan_s = sum(r["plan_seconds"] or 0.0 for r in rows if not r.get("from_grid"))     # the grid's were not run here
    eval_s = sum(sum(r["eval_seconds"].values()) for r in rows)
    cpu_s = sum(sum(r.get("cpu_seconds", {}).values()) for r in rows)
    n = len(pruned)
    lines = [f"# Quality v2 screen: {n} method{'s' * (n != 1)} at {meta['sparsity']:.0%} on fixture 2, calibration "
             f"seed {meta['seed']}", "",
             f"Rel. = mean over the {len(tasks)} tasks of pruned / dense VQA accuracy on the first {meta['vqa_samples']} "
             "held-out questions, with its 95% paired bootstrap interval (the dense model measured on the same CPU); "
             "sorted by Rel. Seconds are wall seconds: the plan's `tamp-fx plan` command, and the evaluation in "
             "process (model load and masks applied in memory, VQA" + (", perplexities" if ppl else "") + ").", "",
             "| method | plan options | Rel. [95% interval] | VQA | " + " | ".join(tasks) + " | "
             + "".join(f"{k} | " for k in ppl) + "plan s | eval s |",
             "|---|---|---:|---:|" + "---:|" * (len(tasks) + len(ppl) + 2)]
    lines += [f"| dense ({c}) | - | {cells(d)} |" for c, d in denses.items()]
    lines += [f"| {r['method']}{' (grid)' if r.get('from_grid') else ''} | {options(r)} | {cells(r)} |" for r in pruned]
    lines += ["", "## How this was measured", "",
              f"Machine: {meta['machine']}; CPUs of the runs: {', '.join(dict.fromkeys(cpu_of(r) for r in rows))}. "
              f"{meta['conversations']} calibration conversations, forward passes in {meta['dtype']}"
              + (f" (fixture 2's weights: sha256 {meta['weights']}...)" if meta.get("weights") else "") + ". "
              f"Total wall time {meta['total_seconds'] / 60:.1f} min (plans {plan_s / 60:.1f}, evaluations "
              f"{eval_s / 60:.1f}); CPU time of the plans and evaluations {cpu_s / 60:.1f} min.", "",
              *(["Methods marked (grid) were not planned again: their rows are the grid's (`quality-v2.json`) "
                 "at this sparsity and seed on the same CPU, answers to these questions and plan seconds included "
                 "(the grid's machine planned about 1.6x faster); their evaluation seconds are not counted."]
                if any(r.get("from_grid") for r in rows) else []), "",
              "The screen runs (resumable: each skips what `screen.jsonl` already has):", "",
              "```", *meta["invocations"], "```", "", meta["note"]]
    docs.mkdir(parents=True, exist_ok=True)
    (docs / f"{REPORT}.md").write_text("\n".join(lines).rstrip() + "\n")
    (docs / f"{REPORT}.json").write_text(json.dumps(meta | {"rows": rows}, indent=1) + "\n")
