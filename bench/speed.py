"""Plan speed: wall time, peak RSS and where the time went (the planner's own stage timers), per
method and dtype, each run in a fresh process on the same calibration windows; optionally the
same plans by llm-compressor (``--peer``) and the held-out perplexity of every result.

    python bench/speed.py --nsamples 128 --seqlen 512 --methods wanda sparsegpt tamp das-sparsegpt \\
        --dtypes float32 bfloat16 --perplexity --peer /path/to/llmcompressor-venv/bin/python
    python bench/speed.py --model FIXTURE2_DIR --calib FIXTURE2_DIR/../calib/calib.jsonl --nsamples 128

The model is a Hugging Face directory (default: SmolLM2-135M converted from its GGUF on the first
run). With a text file the first half calibrates and the second half is held out for
``--perplexity`` (float32, the same evaluator for every result); a JSONL of conversations
(fixture 2) is timed only. ``tamp_fx.plan`` is timed from the call (model loading and
tokenisation included, imports not); the stages come from ``plan.json``'s ``timing``.

``--peer PYTHON``: a Python with ``llmcompressor`` installed (``pip install llmcompressor==0.14.0.1``
in its own virtual environment: it pins another transformers) runs ``oneshot`` with its
``WandaPruningModifier`` / ``SparseGPTModifier`` at the same sparsity on the same token windows
(written to a file by this script), sequential pipeline, model loading included in its time.

``--nproc K`` compares, per method, one process with K threads against K processes (``torchrun``,
gloo on the CPU) with one thread each; with ``--device cuda``, one GPU against K.

Run it alone: any other process on the machine slows plans several-fold (README, "Speed").
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

PEER_METHODS = {"wanda": "WandaPruningModifier", "sparsegpt": "SparseGPTModifier"}


def _cpu() -> str:
    """The CPU's model name (Linux), else the platform's word for it."""
    try:
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def _rss_gib() -> float:
    """This process's peak RSS (GiB), read the same way for both tools: the kernel's ``ru_maxrss``."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)


def one(method: str, model: Path, calib: Path, nsamples: int, seqlen: int, dtype: str | None, device: str | None,
        held_out: Path | None, max_windows: int | None) -> dict:
    """Plan once with tamp-fx (this process), and with ``held_out`` the pruned model's perplexity."""
    import tempfile

    import torch

    import tamp_fx
    from tamp_fx.runtime import distributed
    world = distributed.init_from_env()       # under torchrun: join before the clock starts
    distributed.barrier()
    start = time.perf_counter()
    plan = tamp_fx.plan(model, calib, tamp_fx.PlanConfig(method=method, sparsity=0.5, nsamples=nsamples, seqlen=seqlen),
                        dtype=dtype, device=device)
    seconds = time.perf_counter() - start     # the plan ends in collectives: rank 0's time is the wall time
    distributed.shutdown()
    row = {"tool": "tamp-fx", "method": method, "dtype": plan.timing.get("dtype", dtype),
           "seconds": round(seconds, 1), "peak_rss_gib": _rss_gib(), "threads": torch.get_num_threads(),
           "processes": world.size, "sparsity": plan.summary()["sparsity"], "stages": plan.timing["parts_s"]}
    if held_out is not None:
        with tempfile.TemporaryDirectory(dir=model.parent) as tmp:
            pruned = tamp_fx.apply(model, plan, Path(tmp) / "pruned")
            row.update(_perplexity(pruned, held_out, seqlen, max_windows, device))
    return row


def _perplexity(model: Path, held_out: Path, seqlen: int, max_windows: int | None, device: str | None) -> dict:
    from tamp_fx.evaluate import evaluate
    ppl = evaluate(model, text=held_out, seqlen=seqlen, max_windows=max_windows, device=device, dtype="float32").perplexity
    return {"perplexity": round(ppl.perplexity, 3), "windows": ppl.windows}


def write_windows(model: Path, calib: Path, nsamples: int, seqlen: int, path: Path) -> None:
    """The token windows tamp-fx calibrates on, for the peer to use the same ones."""
    import torch
    from safetensors.torch import save_file

    from tamp_fx.calibrate.samples import load_calibration
    from tamp_fx.load.source import load_config, load_processor, resolve_source
    source = resolve_source(model)
    samples = load_calibration(calib, load_processor(source, load_config(source)), nsamples=nsamples, seqlen=seqlen)
    save_file({"input_ids": torch.cat([s["input_ids"].reshape(1, -1) for s in samples]).contiguous()}, path)


def peer_one(method: str, model: Path, windows: Path, dtype: str, out: Path | None) -> dict:
    """llm-compressor's oneshot on the windows (run by the peer's Python: no tamp_fx here)."""
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers import pruning
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    ids = load_file(windows)["input_ids"]                                     # (n, seqlen)
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    start = time.perf_counter()
    net = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype))
    recipe = getattr(pruning, PEER_METHODS[method])(sparsity=0.5, mask_structure="0:0",   # every decoder layer's linears
                                                     targets=[r"re:model\.layers\.\d+$"], ignore=["re:.*lm_head"])
    oneshot(model=net, dataset=data, recipe=recipe, num_calibration_samples=ids.shape[0], max_seq_length=ids.shape[1],
            pipeline="sequential", shuffle_calibration_samples=False)
    seconds = time.perf_counter() - start
    linears = [m.weight for n, m in net.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n]
    sparsity = sum(int((w == 0).sum()) for w in linears) / sum(w.numel() for w in linears)
    if out is not None:                        # a plain checkpoint (dense tensors) for the shared evaluator
        from safetensors.torch import save_file
        state = {k: v.float().contiguous() for k, v in net.state_dict().items()}
        if net.config.tie_word_embeddings:     # stored once, as transformers does
            state.pop("lm_head.weight", None)
        out.mkdir(parents=True)
        save_file(state, out / "model.safetensors")
    import llmcompressor
    return {"tool": f"llm-compressor {llmcompressor.__version__}", "method": method, "dtype": dtype,
            "seconds": round(seconds, 1), "peak_rss_gib": _rss_gib(), "threads": torch.get_num_threads(),
            "processes": 1, "sparsity": round(sparsity, 6), "stages": {}}


def _peer(method: str, dtype: str, args: argparse.Namespace, windows: Path, held_out: Path | None) -> dict:
    import shutil
    import tempfile
    with tempfile.TemporaryDirectory(dir=args.model.parent) as tmp:
        out = Path(tmp) / "pruned"
        command = [args.peer, __file__, "--peer-one", method, "--dtype", dtype, "--model", str(args.model),
                   "--windows", str(windows)] + (["--peer-out", str(out)] if held_out else [])
        row = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
        if held_out is not None:
            for f in args.model.iterdir():         # config and tokenizer beside the peer's weights
                if f.is_file() and not f.name.endswith(".safetensors") and f.name != "model.safetensors.index.json":
                    shutil.copy(f, out / f.name)
            row.update(_perplexity(out, held_out, args.seqlen, args.max_windows, args.device))
    return row


def _measure(launcher: list[str], threads: int | None, method: str, dtype: str, args: argparse.Namespace,
             calib: Path, held_out: Path | None) -> dict:
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    command = [*launcher, __file__, "--one", method, "--dtype", dtype, "--model", str(args.model), "--calib", str(calib),
               "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen)]
    command += (["--device", args.device] if args.device else []) + (["--held-out", str(held_out)] if held_out else [])
    command += ["--max-windows", str(args.max_windows)] if args.max_windows else []
    out = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def compare_processes(args: argparse.Namespace, calib: Path) -> None:
    """Per method: one process with K threads against K processes with one thread each (on the
    CPU), or one GPU against K (``--device cuda``)."""
    k, gpus = args.nproc, (args.device or "").startswith("cuda")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(k)]
    rows = []
    for method in args.methods:
        one_run = _measure([sys.executable], None if gpus else k, method, args.dtypes[0], args, calib, None)
        many = _measure(torchrun, None if gpus else 1, method, args.dtypes[0], args, calib, None)
        rows.append((method, one_run, many))
        print(one_run, many, flush=True)
    print(f"\n{args.model.name}, {args.nsamples} calibration windows of {args.seqlen} tokens, sparsity 0.5, "
          f"{args.dtypes[0]}; wall time of tamp_fx.plan\n")
    a, b = ("1 GPU", f"{k} GPUs") if gpus else (f"1 process x {k} threads", f"{k} processes x 1 thread")
    print(f"| method | {a} | {b} | speed-up |")
    print("|---|---|---|---|")
    for method, one_run, many in rows:
        print(f"| {method} | {one_run['seconds']:.0f} s | {many['seconds']:.0f} s | {one_run['seconds'] / many['seconds']:.2f}x |")


#: the stage columns of the table, in order (the rest is summed as "rest")
STAGES = ("load", "trace", "layer forwards", "statistics", "token selection", "pruning", "allocation", "writing")


def table(rows: list[dict]) -> list[str]:
    """The rows as a Markdown table: ratios against llm-compressor and against Wanda (same tool and dtype)."""
    lines = ["| tool | method | dtype | wall | llm-compressor / tamp-fx | vs wanda | peak RSS | perplexity | "
             + " | ".join(STAGES) + " | rest |", "|---" * (9 + len(STAGES)) + "|"]
    for r in rows:
        peer = next((p for p in rows if p["tool"] != "tamp-fx" and (p["method"], p["dtype"]) == (r["method"], r["dtype"])), None)
        wanda = next((w for w in rows if (w["tool"], w["method"], w["dtype"]) == (r["tool"], "wanda", r["dtype"])), None)
        ratio = f"{peer['seconds'] / r['seconds']:.2f}x" if peer and r["tool"] == "tamp-fx" else "-"
        ppl = f"{r['perplexity']:.2f}" if "perplexity" in r else "-"
        stages = r["stages"]
        cells = [f"{stages[k]:.1f}" if k in stages else "-" for k in STAGES]
        rest = f"{sum(v for k, v in stages.items() if k not in STAGES):.1f}" if stages else "-"
        vs_wanda = f"{r['seconds'] / wanda['seconds']:.2f}x" if wanda else "-"
        lines.append(f"| {r['tool']} | {r['method']} | {r['dtype']} | {r['seconds']:.1f} s | {ratio} | "
                     f"{vs_wanda} | {r['peak_rss_gib']:.2f} GiB | {ppl} | "
                     + " | ".join(cells) + f" | {rest} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/wikitext2-valid.txt"),
                        help="text split in halves: calibration and held-out (default model only)")
    parser.add_argument("--model", type=Path, default=Path("bench-out/smollm2-135m"))
    parser.add_argument("--calib", type=Path, help="calibration file (default: the first half of --data)")
    parser.add_argument("--methods", nargs="+", default=["wanda", "sparsegpt", "tamp", "das-sparsegpt"])
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], help="compute dtypes of the forward passes")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--perplexity", action="store_true", help="also the held-out perplexity of each result")
    parser.add_argument("--max-windows", type=int, help="perplexity over the first N held-out windows (default: all)")
    parser.add_argument("--peer", help="a Python with llmcompressor: also its Wanda and SparseGPT on the same windows")
    parser.add_argument("--json", type=Path, help="write the rows to this file too")
    parser.add_argument("--nproc", type=int, help="compare 1 process x NPROC threads with NPROC processes x 1 thread "
                                                  "(with --device cuda: 1 GPU with NPROC)")
    for hidden in ("--one", "--dtype", "--held-out", "--peer-one", "--windows", "--peer-out"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peer_one:
        print(json.dumps(peer_one(args.peer_one, args.model, Path(args.windows), args.dtype,
                                  Path(args.peer_out) if args.peer_out else None)))
        return
    if args.one:
        row = one(args.one, args.model, args.calib, args.nsamples, args.seqlen, args.dtype, args.device,
                  Path(args.held_out) if args.held_out else None, args.max_windows)
        if int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps(row))
        return
    held_out = None
    if args.calib is None:
        if not (args.model / "config.json").is_file():
            from tamp_fx import convert
            from tamp_fx.testbeds.demo import smollm2_gguf
            convert(smollm2_gguf(), args.model)
        args.calib, held_out = args.model.parent / "calib-first-half.txt", args.model.parent / "eval-second-half.txt"
        if not args.calib.is_file() or not held_out.is_file():
            text = args.data.read_text(encoding="utf-8")
            middle = text.find("\n", len(text) // 2) + 1
            args.calib.write_text(text[:middle], encoding="utf-8")
            held_out.write_text(text[middle:], encoding="utf-8")
    held_out = held_out if args.perplexity else None
    if args.nproc:
        compare_processes(args, args.calib)
        return
    windows = args.model.parent / f"windows-{args.nsamples}x{args.seqlen}.safetensors"
    if args.peer and not windows.is_file():
        write_windows(args.model, args.calib, args.nsamples, args.seqlen, windows)
    rows = []
    for dtype in args.dtypes:
        for method in args.methods:
            rows.append(_measure([sys.executable], None, method, dtype, args, args.calib, held_out))
            print(json.dumps(rows[-1]), flush=True)
            if args.peer and method in PEER_METHODS:
                rows.append(_peer(method, dtype, args, windows, held_out))
                print(json.dumps(rows[-1]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    print(f"\n{args.model.name}, {args.nsamples} calibration windows of {args.seqlen} tokens ({args.calib.name}), "
          f"sparsity 0.5, {_cpu()}, {rows[0]['threads']} threads, {date.today()}; "
          "wall time from the call (model loading included, imports not), stages in seconds from plan.json's timing"
          + (f"; perplexity in float32 over {rows[0]['windows']} held-out windows" if held_out else "") + "\n")
    print("\n".join(table(rows)))


if __name__ == "__main__":
    main()
