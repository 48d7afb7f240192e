"""Wall time and peak memory of planning SmolLM2-135M with several methods on the same data.

Each method runs in a fresh process (so peak RSS is its own): the model is loaded from a
Hugging Face directory (run `tamp-fx convert` first, or let this script do it), calibration
windows are drawn from the given text file, and `tamp_fx.plan` is timed alone (model
loading excluded, reported separately).

    python bench/plan_speed.py --data ../shared/data/wikitext2-valid.txt --nsamples 32 --seqlen 512
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path


def one(method: str, model: Path, calib: Path, nsamples: int, seqlen: int) -> dict:
    import torch

    import tamp_fx
    start = time.perf_counter()
    plan = tamp_fx.plan(model, calib, tamp_fx.PlanConfig(method=method, sparsity=0.5, nsamples=nsamples, seqlen=seqlen))
    seconds = time.perf_counter() - start
    return {"method": method, "seconds": round(seconds, 1), "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
            "threads": torch.get_num_threads(), "sparsity": plan.summary()["sparsity"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/wikitext2-valid.txt"))
    parser.add_argument("--model", type=Path, default=Path("bench-out/smollm2-135m"))
    parser.add_argument("--methods", nargs="+", default=["wanda", "das", "amia", "tamp"])
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    calib = args.model.parent / "calib-first-half.txt"
    if args.one:
        print(json.dumps(one(args.one, args.model, calib, args.nsamples, args.seqlen)))
        return
    if not (args.model / "config.json").is_file():
        from tamp_fx import convert
        from tamp_fx.demo import smollm2_gguf
        convert(smollm2_gguf(), args.model)
    if not calib.is_file():
        text = args.data.read_text(encoding="utf-8")
        calib.write_text(text[:text.find("\n", len(text) // 2) + 1], encoding="utf-8")
    rows = []
    for method in args.methods:
        out = subprocess.run([sys.executable, __file__, "--one", method, "--model", str(args.model), "--nsamples",
                              str(args.nsamples), "--seqlen", str(args.seqlen)], check=True, capture_output=True, text=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    base = next((r["seconds"] for r in rows if r["method"] == "wanda"), None)
    print(f"\nSmolLM2-135M, {args.nsamples} calibration windows of {args.seqlen} tokens (first half of {args.data.name}), "
          f"sparsity 0.5, CPU threads {rows[0]['threads']}; time of tamp_fx.plan without model loading\n")
    print("| method | plan wall time | vs wanda | peak RSS |")
    print("|---|---|---|---|")
    for r in rows:
        ratio = f"{r['seconds'] / base:.2f}x" if base else "-"
        print(f"| {r['method']} | {r['seconds']:.0f} s | {ratio} | {r['peak_rss_gib']:.2f} GiB |")


if __name__ == "__main__":
    main()
