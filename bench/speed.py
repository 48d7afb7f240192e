"""Wall time and peak memory of planning SmolLM2-135M with several methods on the same data.

Each (method, dtype) runs in a fresh process (so peak RSS is its own): the model is loaded from a
Hugging Face directory (run `tamp-fx convert` first, or let this script do it), calibration
windows are drawn from the first half of the given text file, and `tamp_fx.plan` is timed alone
(model loading included, as layer-by-layer loading reads each layer when it is planned). With
`--perplexity` each plan is applied and the pruned model's perplexity is measured in float32 over
the second half (held out), so the cost of a faster dtype shows beside its time.

    python bench/plan_speed.py --data ../shared/data/wikitext2-valid.txt --nsamples 32 --seqlen 512
    python bench/plan_speed.py --methods wanda tamp --dtypes float32 bfloat16 --nsamples 128 --perplexity

With ``--nproc K`` it compares, per method, one process with K threads against K processes
(``torchrun --standalone --nproc-per-node K``, gloo on the CPU) with one thread each on the same
samples (the plans are the same: docs/usage.md, Multi-GPU); with ``--device cuda``, one GPU against K:

    python bench/plan_speed.py --nproc 2 --nsamples 128 --seqlen 512 --methods wanda tamp
    python bench/plan_speed.py --nproc 8 --device cuda --nsamples 128 --seqlen 512 --methods wanda tamp
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


def one(method: str, model: Path, calib: Path, nsamples: int, seqlen: int, dtype: str, device: str | None,
        held_out: Path | None, max_windows: int | None = None) -> dict:
    import tempfile

    import torch

    import tamp_fx
    from tamp_fx.evaluate import evaluate
    from tamp_fx.runtime import distributed
    world = distributed.init_from_env()       # under torchrun: join before the clock starts
    distributed.barrier()
    start = time.perf_counter()
    plan = tamp_fx.plan(model, calib, tamp_fx.PlanConfig(method=method, sparsity=0.5, nsamples=nsamples, seqlen=seqlen),
                        dtype=dtype, device=device)
    seconds = time.perf_counter() - start     # the plan ends in collectives: rank 0's time is the wall time
    distributed.shutdown()
    row = {"method": method, "dtype": dtype, "seconds": round(seconds, 1),
           "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
           "threads": torch.get_num_threads(), "processes": world.size, "sparsity": plan.summary()["sparsity"]}
    if held_out is not None:
        with tempfile.TemporaryDirectory(dir=model.parent) as tmp:
            pruned = tamp_fx.apply(model, plan, Path(tmp) / "pruned")
            ppl = evaluate(pruned, text=held_out, seqlen=seqlen, max_windows=max_windows, device=device,
                           dtype="float32").perplexity
        row.update(perplexity=round(ppl.perplexity, 3), windows=ppl.windows)
    return row


def _measure(launcher: list[str], threads: int | None, method: str, args: argparse.Namespace) -> dict:
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    command = [*launcher, __file__, "--one", method, "--dtype", args.dtypes[0], "--model", str(args.model),
               "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen)]
    command += ["--device", args.device] if args.device else []
    out = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def compare_processes(args: argparse.Namespace) -> None:
    """Per method: one process with K threads against K processes with one thread each (on the
    CPU), or one GPU against K (``--device cuda``)."""
    k, gpus = args.nproc, (args.device or "").startswith("cuda")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(k)]
    rows = []
    for method in args.methods:
        one_run = _measure([sys.executable], None if gpus else k, method, args)
        many = _measure(torchrun, None if gpus else 1, method, args)
        rows.append((method, one_run, many))
        print(one_run, many, flush=True)
    print(f"\n{args.model.name}, {args.nsamples} calibration windows of {args.seqlen} tokens, sparsity 0.5, "
          f"{args.dtypes[0]}; wall time of tamp_fx.plan\n")
    a, b = ("1 GPU", f"{k} GPUs") if gpus else (f"1 process x {k} threads", f"{k} processes x 1 thread")
    print(f"| method | {a} | {b} | speed-up |")
    print("|---|---|---|---|")
    for method, one_run, many in rows:
        print(f"| {method} | {one_run['seconds']:.0f} s | {many['seconds']:.0f} s | {one_run['seconds'] / many['seconds']:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/wikitext2-valid.txt"))
    parser.add_argument("--model", type=Path, default=Path("bench-out/smollm2-135m"))
    parser.add_argument("--methods", nargs="+", default=["wanda", "das", "amia", "tamp"])
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--dtypes", nargs="+", default=["float32"], help="compute dtypes of the forward passes")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--perplexity", action="store_true", help="also the held-out perplexity of each result")
    parser.add_argument("--max-windows", type=int, help="perplexity over the first N held-out windows (default: all)")
    parser.add_argument("--nproc", type=int, help="compare 1 process x NPROC threads with NPROC processes x 1 thread "
                                                  "(with --device cuda: 1 GPU with NPROC)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", help=argparse.SUPPRESS)
    args = parser.parse_args()
    calib, held_out = args.model.parent / "calib-first-half.txt", args.model.parent / "eval-second-half.txt"
    if args.one:
        row = one(args.one, args.model, calib, args.nsamples, args.seqlen, args.dtype, args.device,
                  held_out if args.perplexity else None, args.max_windows)
        if int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps(row))
        return
    if not (args.model / "config.json").is_file():
        from tamp_fx import convert
        from tamp_fx.testbeds.demo import smollm2_gguf
        convert(smollm2_gguf(), args.model)
    if not calib.is_file() or not held_out.is_file():
        text = args.data.read_text(encoding="utf-8")
        middle = text.find("\n", len(text) // 2) + 1
        calib.write_text(text[:middle], encoding="utf-8")
        held_out.write_text(text[middle:], encoding="utf-8")
    if args.nproc:
        compare_processes(args)
        return
    rows = []
    for dtype in args.dtypes:
        for method in args.methods:
            command = [sys.executable, __file__, "--one", method, "--dtype", dtype, "--model", str(args.model),
                       "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen)]
            command += (["--device", args.device] if args.device else []) + (["--perplexity"] if args.perplexity else [])
            command += ["--max-windows", str(args.max_windows)] if args.max_windows else []
            out = subprocess.run(command, check=True, capture_output=True, text=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    print(f"\nSmolLM2-135M, {args.nsamples} calibration windows of {args.seqlen} tokens (first half of {args.data.name}), "
          f"sparsity 0.5, CPU threads {rows[0]['threads']}; time of tamp_fx.plan (layer-by-layer loading included)"
          + (f"; perplexity in float32 over {rows[0]['windows']} held-out windows of the second half" if args.perplexity else "")
          + "\n")
    print("| method | dtype | plan wall time | vs wanda (same dtype) | peak RSS | perplexity |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        base = next((b["seconds"] for b in rows if b["method"] == "wanda" and b["dtype"] == r["dtype"]), None)
        ratio = f"{r['seconds'] / base:.2f}x" if base else "-"
        ppl = f"{r['perplexity']:.2f}" if "perplexity" in r else "-"
        print(f"| {r['method']} | {r['dtype']} | {r['seconds']:.0f} s | {ratio} | {r['peak_rss_gib']:.2f} GiB | {ppl} |")


if __name__ == "__main__":
    main()
