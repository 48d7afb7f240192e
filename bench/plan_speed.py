"""Wall time and peak memory of planning SmolLM2-135M with several methods on the same data.

Each method runs in a fresh process (so peak RSS is its own): the model is loaded from a
Hugging Face directory (run `tamp-fx convert` first, or let this script do it), calibration
windows are drawn from the given text file, and `tamp_fx.plan` is timed alone (model
loading excluded, reported separately).

    python bench/plan_speed.py --data ../shared/data/wikitext2-valid.txt --nsamples 32 --seqlen 512

With ``--nproc K`` it compares, per method, one process with K threads against K processes
(``torchrun --standalone --nproc-per-node K``, gloo on the CPU) with one thread each, on the
same samples (the plans are the same: README, Multi-GPU):

    python bench/plan_speed.py --nproc 2 --nsamples 128 --seqlen 512 --methods wanda tamp
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path


def one(method: str, model: Path, calib: Path, nsamples: int, seqlen: int) -> dict:
    import torch

    import tamp_fx
    from tamp_fx import distributed
    world = distributed.init_from_env()       # under torchrun: join before the clock starts
    distributed.barrier()
    start = time.perf_counter()
    plan = tamp_fx.plan(model, calib, tamp_fx.PlanConfig(method=method, sparsity=0.5, nsamples=nsamples, seqlen=seqlen))
    seconds = time.perf_counter() - start     # the plan ends in collectives: rank 0's time is the wall time
    distributed.shutdown()
    return {"method": method, "seconds": round(seconds, 1), "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
            "threads": torch.get_num_threads(), "processes": world.size, "sparsity": plan.summary()["sparsity"]}


def _measure(launcher: list[str], threads: int, method: str, args: argparse.Namespace) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    out = subprocess.run([*launcher, __file__, "--one", method, "--model", str(args.model), "--nsamples", str(args.nsamples),
                          "--seqlen", str(args.seqlen)], check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def compare_processes(args: argparse.Namespace) -> None:
    """Per method: one process with K threads against K processes with one thread each."""
    k = args.nproc
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(k)]
    rows = []
    for method in args.methods:
        one = _measure([sys.executable], k, method, args)
        many = _measure(torchrun, 1, method, args)
        rows.append((method, one, many))
        print(one, many, flush=True)
    print(f"\n{args.model.name}, {args.nsamples} calibration windows of {args.seqlen} tokens, sparsity 0.5; "
          f"wall time of tamp_fx.plan\n")
    print(f"| method | 1 process x {k} threads | {k} processes x 1 thread | speed-up |")
    print("|---|---|---|---|")
    for method, one, many in rows:
        print(f"| {method} | {one['seconds']:.0f} s | {many['seconds']:.0f} s | {one['seconds'] / many['seconds']:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/wikitext2-valid.txt"))
    parser.add_argument("--model", type=Path, default=Path("bench-out/smollm2-135m"))
    parser.add_argument("--methods", nargs="+", default=["wanda", "das", "amia", "tamp"])
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--nproc", type=int, help="compare 1 process x NPROC threads with NPROC processes x 1 thread")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    calib = args.model.parent / "calib-first-half.txt"
    if args.one:
        result = one(args.one, args.model, calib, args.nsamples, args.seqlen)
        if int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps(result))
        return
    if not (args.model / "config.json").is_file():
        from tamp_fx import convert
        from tamp_fx.demo import smollm2_gguf
        convert(smollm2_gguf(), args.model)
    if not calib.is_file():
        text = args.data.read_text(encoding="utf-8")
        calib.write_text(text[:text.find("\n", len(text) // 2) + 1], encoding="utf-8")
    if args.nproc:
        compare_processes(args)
        return
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
