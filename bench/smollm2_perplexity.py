"""SmolLM2-135M perplexity after pruning: dense, magnitude 50%, Wanda 50%.

Calibration: 128 windows of 512 tokens from the first half of WikiText-2 validation;
evaluation: every non-overlapping 512-token window of its second half. Each step runs the
`tamp-fx` command a user would run; its wall time (model loading included) is measured
around the subprocess.

    python bench/smollm2_perplexity.py --data ../shared/data/wikitext2-valid.txt --workdir bench-out
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

TAMP_FX = [sys.executable, "-m", "tamp_fx.cli.main"]


def run(args: list[str], log: list[dict]) -> str:
    start = time.perf_counter()
    done = subprocess.run(TAMP_FX + args, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"tamp-fx {shlex.join(args)} failed:\n{done.stderr}")
    out = done.stdout
    seconds = time.perf_counter() - start
    log.append({"command": "tamp-fx " + shlex.join(args), "seconds": round(seconds, 1)})
    print(f"  {seconds:7.1f} s  tamp-fx {shlex.join(args)}", flush=True)
    return out


def split_halves(data: Path, workdir: Path) -> tuple[Path, Path]:
    text = data.read_text(encoding="utf-8")
    middle = text.find("\n", len(text) // 2) + 1
    calib, evaluation = workdir / "calib-first-half.txt", workdir / "eval-second-half.txt"
    calib.write_text(text[:middle], encoding="utf-8")
    evaluation.write_text(text[middle:], encoding="utf-8")
    return calib, evaluation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/wikitext2-valid.txt"))
    parser.add_argument("--workdir", type=Path, default=Path("bench-out"))
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--methods", nargs="+", default=["magnitude", "wanda"])
    parser.add_argument("--sparsity", type=float, default=0.5)
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    calib, evaluation = split_halves(args.data, args.workdir)
    from tamp_fx.testbeds.demo import smollm2_gguf
    log: list[dict] = []
    dense = args.workdir / "smollm2-135m"
    if not (dense / "config.json").is_file():
        run(["convert", str(smollm2_gguf()), "--out", str(dense), "--overwrite"], log)
    rows = []

    def evaluate(model: Path) -> dict:
        return json.loads(run(["eval", str(model), "--text", str(evaluation), "--seqlen", str(args.seqlen),
                               "--json", "-"], log))

    result = evaluate(dense)
    rows.append({"method": "dense", "sparsity": 0.0, "perplexity": result["perplexity"], "plan_seconds": None,
                 "windows": result["windows"]})
    for method in args.methods:
        plan_dir, out = args.workdir / f"plan-{method}", args.workdir / f"smollm2-135m-{method}"
        run(["plan", str(dense), "--calib", str(calib), "--method", method, "--sparsity", str(args.sparsity),
             "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--out", str(plan_dir), "--overwrite", "-q"], log)
        plan_seconds = log[-1]["seconds"]
        run(["apply", str(dense), str(plan_dir), "--out", str(out), "--overwrite", "-q"], log)
        summary = json.loads((plan_dir / "plan.json").read_text())["summary"]
        result = evaluate(out)
        rows.append({"method": method, "sparsity": summary["sparsity"], "perplexity": result["perplexity"],
                     "plan_seconds": plan_seconds, "windows": result["windows"]})

    print(f"\nSmolLM2-135M-Instruct (GGUF Q4_1, de-quantized to float32), WikiText-2 validation: calibration "
          f"{args.nsamples} x {args.seqlen} tokens from the first half, perplexity over {rows[0]['windows']} "
          f"windows of {args.seqlen} tokens of the second half\n")
    print("| method | decoder sparsity | perplexity | plan wall time |")
    print("|---|---|---|---|")
    for r in rows:
        t = "-" if r["plan_seconds"] is None else f"{r['plan_seconds']:.0f} s"
        print(f"| {r['method']} | {r['sparsity']:.2%} | {r['perplexity']:.2f} | {t} |")
    (args.workdir / "results.json").write_text(json.dumps({"rows": rows, "commands": log}, indent=1))


if __name__ == "__main__":
    main()
