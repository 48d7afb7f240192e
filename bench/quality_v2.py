"""Benchmark v2: every method on fixture 2 (LLaVA-NeXT, 88 image tokens), with error bars.

For each method, sparsity and calibration seed this plans as a user would, with `tamp-fx plan`
on 128 ShareGPT4V-style conversations about fixture 2's scenes, then evaluates the pruned model in
this process (the plan's masks applied to the loaded fixture in memory, the bytes `tamp-fx apply`
would write: :mod:`quality_v2_runs`): VQA on the 1,200 held-out questions (per question, so
intervals can be computed), perplexity on held-out scene descriptions (in-distribution, seed 104)
and on the second half of WikiText-2 validation. Sparsities 50%, 60%, 70%; three calibration seeds
at 60%, one at 50% and 70%. Each calibration seed is its own set of conversations
(:func:`tamp_fx.testbeds.fixture2.data.calibration_seed`: seed 0 is the fixture's ``calib/``, seed s the
set ``calib-seed<s>/`` drawn from other scenes), also passed to `plan --seed`; with as many
samples as conversations, a seed that only reordered one set would change nothing but the order.

Measures: per-task accuracy with a 95% bootstrap interval (questions resampled within each
task); Rel. as the paper defines it: the mean over tasks of pruned / dense accuracy, with a
paired bootstrap interval (the same resampled questions for the dense and the pruned model,
measured on the same CPU: bfloat16 kernels differ between CPUs, and 17 of the dense model's
1,200 answers changed between an Intel Xeon with AMX and an AMD EPYC, so every row records its
CPU and the dense model is measured once on each);
perplexities beside it, not mixed in. At 60% the table gives the mean over seeds and their
spread (min-max). Rows go to ``WORKDIR/results.jsonl`` as they come, so an interrupted run
resumes; the report goes to ``--docs`` (quality-v2.md, .csv, .json, .png).

``--screen`` runs the screen instead (:mod:`screen`: many methods at one sparsity and seed, 600
questions, its own report ``quality-v2-screen.md``).

Needs fixture 2's trained weights (``python -m tamp_fx.testbeds.fixture2.train``). Run it alone:

    python bench/quality_v2.py --data ../shared/data/wikitext2-valid.txt --workdir bench-out/quality-v2
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from quality import Results, pyplot  # noqa: E402
from quality_v2_runs import (  # noqa: E402
    FIRST_CPU,
    begin_runs,
    cpu_of,
    hits_of,
    method_name,
    plan_options,
    plan_statistics,
    rel_with_interval,
    task_interval,
    weights_id,
)

__all__ = ["FIRST_CPU", "METHODS", "SEEDS", "plan_statistics", "rel_with_interval", "weights_id", "write_outputs"]

#: the grid's methods (names as :func:`quality_v2_runs.plan_options` reads them) -> their `tamp-fx plan`
#: options; the last three go beyond the paper. ``--methods`` takes any other name too.
METHODS: dict[str, list[str]] = {m: plan_options(m) for m in (
    "magnitude", "wanda", "sparsegpt", "owl", "ecoflap", "das", "amia", "tamp",
    "das-size",          # das with its allocation replaced
    "tamp-size",         # tamp with its allocation replaced
    "tamp-sparsegpt")}
SEEDS = {0.5: (0,), 0.6: (0, 1, 2), 0.7: (0,)}


def grid_methods(pruned: list[dict]) -> list[str]:
    """The methods of the grid :data:`METHODS`, then those of ``pruned`` beyond it, in order."""
    return list(dict.fromkeys([*METHODS, *(r["method"] for r in pruned)]))


# ----------------------------------------------------------------------------- report

def write_outputs(rows: list[dict], docs: Path, meta: dict) -> None:
    rng = np.random.default_rng(0)
    denses = {cpu_of(r): r for r in rows if r["method"] == "dense"}     # cpu -> the dense row measured on it
    dense = next(iter(denses.values()))
    tasks = list(dense["hits"])
    pruned = []
    for r in rows:
        if r["method"] != "dense":
            rel, lo, hi = rel_with_interval(r, denses.get(cpu_of(r), dense), rng)
            pruned.append(r | {"rel": rel, "rel_lo": lo, "rel_hi": hi,
                               **{f"acc_{t}": float(h.mean()) for t, h in hits_of(r).items()}})
    sparsities = sorted({r["target"] for r in pruned})
    methods = [m for m in grid_methods(pruned) if any(r["method"] == m for r in pruned)]
    docs.mkdir(parents=True, exist_ok=True)

    fields = ["method", "target", "seed", "sparsity", "vqa", *[f"acc_{t}" for t in tasks], "rel", "rel_lo", "rel_hi",
              "ppl_desc", "ppl_wiki", "plan_seconds"]
    dense_rows = [d | {f"acc_{t}": float(h.mean()) for t, h in hits_of(d).items()} | {"rel": 1.0} for d in denses.values()]
    with (docs / "quality-v2.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields + ["cpu"], extrasaction="ignore")
        writer.writeheader()
        for r in dense_rows + pruned:
            r = r | {"cpu": cpu_of(r)}
            writer.writerow({k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.items()})

    def runs(m, s):
        return [r for r in pruned if r["method"] == m and r["target"] == s]

    def rel_cell(m, s):
        match = runs(m, s)
        if not match:
            return "-"
        if len(match) == 1:
            r = match[0]
            return f"{r['rel']:.3f} [{r['rel_lo']:.3f}, {r['rel_hi']:.3f}]"
        rels = [r["rel"] for r in match]
        return f"{np.mean(rels):.3f} (seeds {min(rels):.3f}-{max(rels):.3f})"

    def mean_cell(m, s, key, fmt):
        match = runs(m, s)
        return fmt.format(np.mean([r[key] for r in match])) if match else "-"

    header = ["| method | " + " | ".join(f"{s:.0%}" for s in sparsities) + " |", "|---|" + "---:|" * len(sparsities)]
    lines = ["# Quality v2: every method on fixture 2 (LLaVA-NeXT, 88 image tokens per image)", "",
             *[f"Dense on {c}: VQA {d['vqa']:.1%} on {meta['vqa_samples']} held-out questions; perplexity "
               f"{d['ppl_desc']:.2f} on held-out scene descriptions ({d['windows_desc']} windows of 512 tokens), "
               f"{d['ppl_wiki']:.2f} on WikiText-2 (second half of validation, {d['windows_wiki']} windows)."
               for c, d in denses.items()], "", *_cpu_lines(pruned, denses), *_missing(pruned), "",
             "## Rel. (mean over tasks of pruned / dense VQA accuracy, 95% paired bootstrap interval; "
             "at 60% the mean over calibration seeds and their range; the plot `quality-v2.png` draws the same "
             "as error bars)", "", *header]
    lines += [f"| {m} | " + " | ".join(rel_cell(m, s) for s in sparsities) + " |" for m in methods]
    for title, key, fmt in (("VQA accuracy (overall)", "vqa", "{:.1%}"),
                            ("Perplexity, held-out descriptions", "ppl_desc", "{:.2f}"),
                            ("Perplexity, WikiText-2", "ppl_wiki", "{:.2f}"),
                            ("Plan wall time (s)", "plan_seconds", "{:.0f}")):
        lines += ["", f"## {title}", "", *header]
        lines += [f"| {m} | " + " | ".join(mean_cell(m, s, key, fmt) for s in sparsities) + " |" for m in methods]
    lines += _plan_lines(pruned)
    lines += ["", "## VQA accuracy per task (95% bootstrap interval)", "",
              "| method | sparsity | seed | " + " | ".join(tasks) + " |", "|---|---:|---:|" + "---:|" * len(tasks)]
    for r in list(denses.values()) + sorted(pruned, key=lambda r: (r["target"], methods.index(r["method"]), r["seed"])):
        cells = []
        for t, h in hits_of(r).items():
            lo, hi = task_interval(h, rng)
            cells.append(f"{h.mean():.1%} [{lo:.0%}, {hi:.0%}]")
        seed = "-" if r.get("seed") is None else r["seed"]
        lines.append(f"| {r['method']} | {r['target']:.0%} | {seed} | " + " | ".join(cells) + " |")
    lines += ["", "## How this was measured", "",
              f"Machine: {meta['machine']}; CPUs of the runs: {', '.join(dict.fromkeys(cpu_of(r) for r in rows))}. Forward passes in {meta.get('dtype', 'float32')}. "
              + (f"Fixture 2's weights: sha256 {meta['weights']}... " if meta.get("weights") else "")
              + f"Total wall time {meta['total_seconds'] / 60:.0f} min.", "",
              "The benchmark runs (resumable: each skips what `results.jsonl` already has):", "",
              "```", *meta["invocations"], "```", "",
              "Every `tamp-fx` command and in-process evaluation they ran, with its wall time, is in `quality-v2.json`. " + meta["note"]]
    (docs / "quality-v2.md").write_text("\n".join(lines) + "\n")
    (docs / "quality-v2.json").write_text(json.dumps(meta | {"rows": rows}, indent=1) + "\n")
    _plot(pruned, methods, sparsities, docs / "quality-v2.png")


def _cpu_lines(pruned: list[dict], denses: dict[str, dict]) -> list[str]:
    """Which CPU measured which runs, and how many dense answers differ between the CPUs."""
    if len(denses) < 2:
        return []
    by_cpu: dict[str, set] = {}
    for r in pruned:
        by_cpu.setdefault(cpu_of(r), set()).add(f"{r['target']:.0%}")
    (first, base), *others = denses.items()
    questions = sum(len(h) for h in base["hits"].values())
    differ = [f"{sum(a != b for t in base['hits'] for a, b in zip(base['hits'][t], d['hits'][t]))} of its "
              f"{questions} answers differ between {first} and {c}" for c, d in others]
    return ["Runs by CPU: " + "; ".join(f"{c}: {', '.join(sorted(v))}" for c, v in by_cpu.items())
            + ". Each run's Rel. is paired with the dense model measured on its CPU, since bfloat16 kernels differ: "
            + "; ".join(differ) + ".", ""]


def _plan_lines(pruned: list[dict]) -> list[str]:
    """What the plans decided (seed 0 of each method and sparsity): the allocation by projection
    type and, where there is a token selection, the share of text and image tokens it kept."""
    order = grid_methods(pruned)
    rows = sorted((r for r in pruned if r.get("seed") == 0 and r.get("plan_stats")),
                  key=lambda r: (r["target"], order.index(r["method"])))
    if not rows:
        return []
    projections = list(dict.fromkeys(p for r in rows for p in r["plan_stats"]["sparsity_by_projection"]))
    modalities = list(dict.fromkeys(m for r in rows for m in r["plan_stats"]["selected_fraction"]))
    lines = ["", "## What the plans decided (seed 0)", "",
             "Mean sparsity of each projection over the layers (the allocation), and the mean over linears of the "
             "share of each modality's calibration tokens that the token selection kept (AMIA; '-' without one).", "",
             "| method | sparsity | " + " | ".join(projections) + " | " + " | ".join(f"kept {m} tokens" for m in modalities)
             + " |", "|---|---:|" + "---:|" * (len(projections) + len(modalities))]
    for r in rows:
        st = r["plan_stats"]
        cells = [f"{st['sparsity_by_projection'].get(p, float('nan')):.1%}" for p in projections]
        cells += [f"{st['selected_fraction'][m]:.1%}" if m in st["selected_fraction"] else "-" for m in modalities]
        lines.append(f"| {r['method']} | {r['target']:.0%} | " + " | ".join(cells) + " |")
    diversity = next((r["plan_stats"]["diversity"] for r in rows if r["plan_stats"]["diversity"]), None)
    if diversity:
        lines += ["", "Mean diversity of the calibration activations over linears (DAS's measure; from the first "
                  "plan that has it): " + ", ".join(f"{m} {v:.3f}" for m, v in diversity.items()) + "."]
    return lines


def _missing(pruned: list[dict]) -> list[str]:
    """A sentence naming the runs of the full grid (every method of :func:`grid_methods`,
    :data:`SEEDS`) not in ``pruned``."""
    have = {(r["method"], r["target"], r["seed"]) for r in pruned}
    methods = grid_methods(pruned)
    missing = [f"{m} {s:.0%} seed {seed}" for s, seeds in SEEDS.items() for seed in seeds for m in methods
               if (m, s, seed) not in have]
    if not missing:
        return [f"Every run of the grid ({len(methods)} methods; 50% and 70% with one calibration seed, 60% with three) is here."]
    return [f"**Not run yet** ({len(missing)} of {len(missing) + len(have)} runs; a '-' below): " + ", ".join(missing)
            + ". The benchmark resumes from this report's rows (see the commands at the end)."]


def _plot(pruned: list[dict], methods: list[str], sparsities: list[float], path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6.5, 4.5), dpi=120)
    for k, m in enumerate(methods):
        xs, ys, err = [], [], [[], []]
        for s in sparsities:
            match = [r for r in pruned if r["method"] == m and r["target"] == s]
            if not match:
                continue
            y = float(np.mean([r["rel"] for r in match]))
            lo = min(r["rel_lo"] for r in match) if len(match) == 1 else min(r["rel"] for r in match)
            hi = max(r["rel_hi"] for r in match) if len(match) == 1 else max(r["rel"] for r in match)
            xs.append(s + 0.002 * (k - len(methods) / 2))   # a little apart, so the bars do not overlap
            ys.append(y)
            err[0].append(y - lo)
            err[1].append(hi - y)
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=2, label=m, linewidth=2.5 if m == "tamp" else 1.2,
                    color=plt.get_cmap("tab20")(k % 20))   # 11 methods: the default cycle has 10 colours
    ax.set_xlabel("sparsity of the language decoder")
    ax.set_ylabel("Rel. (mean over tasks of pruned / dense accuracy)")
    ax.set_title("Fixture 2 (LLaVA-NeXT + SmolLM2-135M): Rel. against sparsity")
    ax.set_xticks(sparsities)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path)


# ----------------------------------------------------------------------------- main

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/wikitext2-valid.txt"))
    parser.add_argument("--workdir", type=Path, default=Path("bench-out/quality-v2"))
    parser.add_argument("--docs", type=Path, default=Path("docs"))
    parser.add_argument("--methods", nargs="+", type=method_name, metavar="METHOD",
                        help="methods by name: a --method shortcut, das-size or tamp-size, then +SCORE, +TOKENS or "
                             "+ALLOCATION parts (das+sparsegpt+atv); default: the grid's, or with --screen the screen's")
    parser.add_argument("--sparsities", nargs="+", type=float, default=sorted(SEEDS))
    parser.add_argument("--seeds-at-60", type=int, default=3, help="calibration seeds at 60%% (one elsewhere)")
    parser.add_argument("--conversations", type=int, default=128)
    parser.add_argument("--vqa-samples", type=int, help="held-out questions (default: 1200; 600 with --screen)")
    parser.add_argument("--max-windows", type=int, default=None, help="perplexity windows per text (default: all)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="dtype of the plans' and evaluations' forward passes (bfloat16 planned 1.5x faster on "
                             "the 2-core AVX-512 BF16 development machine, emulated and slower than float32 on an AVX2-only "
                             "CPU; statistics stay float32/float64)")
    parser.add_argument("--report-only", action="store_true", help="rewrite the docs from the workdir's rows")
    parser.add_argument("--note", default="", help="a sentence for the report (e.g. what else ran on the machine)")
    screen = parser.add_argument_group("the screen (bench/screen.py): one sparsity, one calibration seed")
    screen.add_argument("--screen", action="store_true", help="screen --methods instead of running the grid")
    screen.add_argument("--sparsity", type=float, default=0.6)
    screen.add_argument("--seed", type=int, default=0, help="calibration seed")
    screen.add_argument("--perplexities", action="store_true", help="also measure both perplexities (the grid always does)")
    screen.add_argument("--from-grid", nargs="+", type=method_name, metavar="METHOD",
                        help="take these methods' rows from the grid's report (same sparsity, seed, CPU, settings) "
                             "instead of planning them again")
    args = parser.parse_args()
    if args.screen:
        from screen import run_screen
        run_screen(args)
        return
    args.methods, args.vqa_samples = args.methods or list(METHODS), args.vqa_samples or 1200

    state = Results(args.workdir, args.docs / "quality-v2.json")
    # what makes rows comparable: a resumed run (here or from the committed report on a fresh
    # clone) must measure with the same settings, or its rows would be mixed silently
    settings = {"conversations": args.conversations, "vqa_samples": args.vqa_samples, "max_windows": args.max_windows,
                "dtype": args.dtype, "calibration": "a set of conversations per seed"}
    if not args.report_only:
        fixture, record = begin_runs(args, state, settings)
        for sparsity in args.sparsities:
            seeds = range(args.seeds_at_60) if abs(sparsity - 0.6) < 1e-9 else (0,)
            for seed in seeds:
                for method in args.methods:
                    if not any(r["method"] == method and r["target"] == sparsity and r["seed"] == seed for r in state.rows):
                        record(fixture.run(method, sparsity, seed))
    rows = state.rows
    meta = state.meta() | {"note": args.note, **(rows[0].get("settings", settings) if rows else settings)}
    write_outputs(rows, args.docs, meta)
    print(f"wrote {args.docs}/quality-v2.md, .csv, .json and .png")


if __name__ == "__main__":
    main()
