"""What survives pruning: every method at several sparsities on the multimodal fixture.

For each method and sparsity this runs the `tamp-fx` commands a user would run: `plan` on
128 conversations from the fixture's training distribution, `apply`, then `eval` for VQA
accuracy on the held-out split and perplexity on the second half of WikiText-2 validation.
Relative performance as in the TAMP paper: pruned / dense for VQA accuracy, dense / pruned
for perplexity, and Rel. = their mean. Each command's wall time is measured around the
subprocess (model loading included). Results go to ``WORKDIR/results.jsonl`` as they come,
so an interrupted run resumes where it stopped (in a fresh clone, from the rows committed in
``docs/quality.json``); the tables and the plot are written to ``--docs`` (quality.md,
quality.csv, quality.png, quality.json).

    python bench/quality.py --data ../shared/data/wikitext2-valid.txt --workdir bench-out/quality
"""
from __future__ import annotations

import argparse
import csv
import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from smollm2_perplexity import split_halves  # noqa: E402

TAMP_FX = [sys.executable, "-m", "tamp_fx.cli.main"]
METHODS = ["magnitude", "wanda", "sparsegpt", "owl", "ecoflap", "das", "amia", "tamp"]
TASKS = ["colour", "shape", "count", "side", "presence", "character"]


def run(args: list[str], log: list[dict]) -> str:
    start = time.perf_counter()
    done = subprocess.run(TAMP_FX + args, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"tamp-fx {shlex.join(args)} failed:\n{done.stderr}")
    seconds = time.perf_counter() - start
    log.append({"command": "tamp-fx " + shlex.join(args), "seconds": round(seconds, 1)})
    print(f"  {seconds:7.1f} s  tamp-fx {shlex.join(args)}", flush=True)
    return done.stdout


def relative(row: dict, dense: dict) -> dict:
    vqa = row["vqa"] / dense["vqa"]
    ppl = dense["perplexity"] / row["perplexity"]
    return {"rel_vqa": vqa, "rel_ppl": ppl, "rel": (vqa + ppl) / 2}


def write_outputs(rows: list[dict], docs: Path, meta: dict) -> None:
    dense = next(r for r in rows if r["method"] == "dense")
    pruned = [r | relative(r, dense) for r in rows if r["method"] != "dense"]
    sparsities = sorted({r["target"] for r in pruned})
    methods = list(dict.fromkeys([*(m for m in METHODS if any(r["method"] == m for r in pruned)),
                                  *(r["method"] for r in pruned)]))   # the paper's first, then the others as run
    docs.mkdir(parents=True, exist_ok=True)

    fields = ["method", "target", "sparsity", "vqa", *[f"vqa_{t}" for t in TASKS], "perplexity", "rel_vqa", "rel_ppl",
              "rel", "plan_seconds"]
    with (docs / "quality.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for r in [dense | {"rel_vqa": 1.0, "rel_ppl": 1.0, "rel": 1.0}] + pruned:
            writer.writerow({k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.items()})

    def cell(method, target, key, fmt):
        match = [r for r in pruned if r["method"] == method and r["target"] == target]
        return fmt.format(match[0][key]) if match else "-"

    lines = ["# Quality: every method on the multimodal fixture", "",
             f"Dense: VQA {dense['vqa']:.1%} ({meta['vqa_samples']} held-out questions), perplexity "
             f"{dense['perplexity']:.2f} ({dense['windows']} x {dense['seqlen']} tokens of the second half of "
             "WikiText-2 validation).", "",
             "## Rel. (mean of pruned/dense VQA accuracy and dense/pruned perplexity)", "",
             "| method | " + " | ".join(f"{s:.0%}" for s in sparsities) + " |",
             "|---|" + "---:|" * len(sparsities)]
    lines += [f"| {m} | " + " | ".join(cell(m, s, "rel", "{:.3f}") for s in sparsities) + " |" for m in methods]
    for title, key, fmt in (("VQA accuracy", "vqa", "{:.1%}"), ("Perplexity", "perplexity", "{:.2f}"),
                            ("Plan wall time (s)", "plan_seconds", "{:.0f}")):
        lines += ["", f"## {title}", "", "| method | " + " | ".join(f"{s:.0%}" for s in sparsities) + " |",
                  "|---|" + "---:|" * len(sparsities)]
        lines += [f"| {m} | " + " | ".join(cell(m, s, key, fmt) for s in sparsities) + " |" for m in methods]
    lines += ["", "## VQA accuracy per task", "", "| method | sparsity | " + " | ".join(TASKS) + " |",
              "|---|---:|" + "---:|" * len(TASKS)]
    lines.append("| dense | 0% | " + " | ".join(f"{dense[f'vqa_{t}']:.1%}" for t in TASKS) + " |")
    for m in methods:
        for s in sparsities:
            match = [r for r in pruned if r["method"] == m and r["target"] == s]
            if match:
                lines.append(f"| {m} | {s:.0%} | " + " | ".join(f"{match[0][f'vqa_{t}']:.1%}" for t in TASKS) + " |")
    lines += ["", "## How this was measured", "", f"Machine: {meta['machine']}. Total wall time {meta['total_seconds'] / 60:.0f} min.",
              "", "The benchmark runs (resumable: each skips what `results.jsonl` already has):", "",
              "```", *meta["invocations"], "```", "",
              "Every `tamp-fx` command they ran, with its wall time, is in `quality.json`. " + meta["note"]]
    (docs / "quality.md").write_text("\n".join(lines) + "\n")
    (docs / "quality.json").write_text(json.dumps(meta | {"rows": rows}, indent=1) + "\n")
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=120)
    for m in methods:
        pts = sorted((r["target"], r["rel"]) for r in pruned if r["method"] == m)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m,
                linewidth=2.5 if m == "tamp" else 1.2)
    ax.set_xlabel("sparsity of the language decoder")
    ax.set_ylabel("Rel. (pruned / dense, VQA and perplexity)")
    ax.set_title("SmolLM2-135M fixture: Rel. against sparsity")
    ax.set_xticks(sparsities)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(docs / "quality.png")


def pyplot():
    """matplotlib.pyplot drawing to files, or None (saying so) when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[plot]'): no plot written")
        return None
    return plt


class Results:
    """A benchmark's state in its workdir: rows (``results.jsonl``), the commands run with their
    wall times (``commands.json``) and the invocations (``invocations.txt``). A fresh clone
    resumes from the rows, commands and invocations of the committed report ``committed``.
    Another ``name`` keeps another benchmark's state beside it: ``NAME.jsonl``,
    ``NAME-commands.json``, ``NAME-invocations.txt``."""

    def __init__(self, workdir: Path, committed: Path, name: str = "results"):
        workdir.mkdir(parents=True, exist_ok=True)
        prefix = "" if name == "results" else f"{name}-"
        self.results, self.log_file, self.invocations = (workdir / f"{name}.jsonl", workdir / f"{prefix}commands.json",
                                                         workdir / f"{prefix}invocations.txt")
        if not self.results.exists() and committed.exists():
            saved = json.loads(committed.read_text())
            self.results.write_text("".join(json.dumps(r) + "\n" for r in saved["rows"]))
            self.log_file.write_text(json.dumps(saved["commands"], indent=1))
            self.invocations.write_text("\n".join(saved["invocations"]) + "\n")
        self.rows = [json.loads(line) for line in self.results.read_text().splitlines()] if self.results.exists() else []
        self.log: list[dict] = json.loads(self.log_file.read_text()) if self.log_file.exists() else []
        self.begin = time.perf_counter() - sum(e["seconds"] for e in self.log)

    def invoked(self) -> None:
        with self.invocations.open("a") as f:
            f.write("python " + shlex.join(sys.argv) + "\n")

    def record(self, row: dict) -> None:
        self.rows.append(row)
        with self.results.open("a") as f:
            f.write(json.dumps(row) + "\n")
        self.log_file.write_text(json.dumps(self.log, indent=1))

    def meta(self) -> dict:
        return {"invocations": self.invocations.read_text().splitlines() if self.invocations.exists() else [],
                "total_seconds": time.perf_counter() - self.begin, "commands": self.log, "machine": _machine()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/wikitext2-valid.txt"))
    parser.add_argument("--workdir", type=Path, default=Path("bench-out/quality"))
    parser.add_argument("--docs", type=Path, default=Path("docs"))
    from quality_v2_runs import method_name, plan_options  # (it imports this module's run)
    parser.add_argument("--methods", nargs="+", default=METHODS, type=method_name,
                        help="method names as benchmark v2 reads them: a shortcut, then +score/+tokens/+allocation "
                             "(wanda+atv, das+sparsegpt)")
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.5, 0.6, 0.7])
    parser.add_argument("--conversations", type=int, default=128)
    parser.add_argument("--vqa-samples", type=int, default=600)
    parser.add_argument("--max-windows", type=int, default=None, help="perplexity windows (default: all of them)")
    parser.add_argument("--report-only", action="store_true", help="rewrite the docs from results.jsonl")
    parser.add_argument("--note", default="", help="a sentence for the report (e.g. what else ran on the machine)")
    args = parser.parse_args()
    w = args.workdir
    state = Results(w, args.docs / "quality.json")
    rows, log, record = state.rows, state.log, state.record
    if not args.report_only:
        state.invoked()
        _, evaluation = split_halves(args.data, w)
        fixture, calib = w / "fixture", w / "calib"
        if not (fixture / "config.json").is_file():
            run(["fixture", "--out", str(fixture), "--calib-out", str(calib), "--conversations", str(args.conversations),
                 "--overwrite"], log)
        eval_args = ["--text", str(evaluation), "--vqa-samples", str(args.vqa_samples), "--vqa", "--json", "-", "-q"]
        if args.max_windows:
            eval_args += ["--max-windows", str(args.max_windows)]

        def evaluate(model: Path) -> dict:
            r = json.loads(run(["eval", str(model), *eval_args], log))
            return {"vqa": r["vqa"]["accuracy"], **{f"vqa_{t}": r["vqa"]["per_task"][t] for t in TASKS},
                    "perplexity": r["perplexity"], "windows": r["windows"], "seqlen": r["seqlen"]}

        if not any(r["method"] == "dense" for r in rows):
            record({"method": "dense", "target": 0.0, "sparsity": 0.0, "plan_seconds": None, **evaluate(fixture)})
        for sparsity in args.sparsities:
            for method in args.methods:
                if any(r["method"] == method and r["target"] == sparsity for r in rows):
                    continue
                plan_dir, out = w / f"plan-{method}-{sparsity}", w / "pruned"
                run(["plan", str(fixture), "--calib", str(calib / "calib.jsonl"), *plan_options(method), "--sparsity",
                     str(sparsity), "--nsamples", str(args.conversations), "--out", str(plan_dir), "--overwrite", "-q"], log)
                plan_seconds = log[-1]["seconds"]
                run(["apply", str(fixture), str(plan_dir), "--out", str(out), "--overwrite", "-q"], log)
                summary = json.loads((plan_dir / "plan.json").read_text())["summary"]
                row = {"method": method, "target": sparsity, "sparsity": summary["sparsity"],
                       "plan_seconds": plan_seconds, **evaluate(out)}
                shutil.rmtree(out)
                record(row)
    meta = state.meta() | {"note": args.note, "vqa_samples": args.vqa_samples, "conversations": args.conversations}
    write_outputs(rows, args.docs, meta)
    print(f"wrote {args.docs}/quality.md, quality.csv, quality.json and quality.png")


def _machine() -> str:
    import os
    import platform
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"


if __name__ == "__main__":
    main()
